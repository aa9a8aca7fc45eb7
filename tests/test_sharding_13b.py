"""radfm_13b on an abstract 64-device mesh: at most 2% of parameter bytes replicated per preset,
optimizer-state shardings derived from the parameter shardings. Nothing is allocated."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import conftest_data as cd

SCRIPT = textwrap.dedent('''
    import json
    import jax, optax
    from jax.sharding import NamedSharding
    from radfm_jax import sharding
    from radfm_jax.config import MeshConfig, model_config
    from radfm_jax.models.radfm import abstract_model, count_params, param_bytes
    cfg = model_config('radfm_13b')
    out = {}
    for preset, ici in (('fsdp', (('data', 1), ('fsdp', -1), ('tensor', 1))),
                        ('fsdp_tp', (('data', 1), ('fsdp', -1), ('tensor', 4)))):
      mesh = sharding.make_mesh(MeshConfig(ici=ici, rules=preset))
      rules = sharding.LOGICAL_RULES[preset]
      _, state = abstract_model(cfg, mesh, rules)
      shardings = jax.tree.map(lambda x: x.sharding, state)
      tx = optax.adamw(1e-4)
      opt = sharding.optimizer_shardings(tx, state, shardings, mesh)
      moments = [s for s in jax.tree.leaves(opt, is_leaf=lambda x: isinstance(x, NamedSharding))]
      mu = jax.tree.leaves(opt[0].mu, is_leaf=lambda x: isinstance(x, NamedSharding))
      same = all(a == b for a, b in zip(mu, jax.tree.leaves(
          shardings, is_leaf=lambda x: isinstance(x, NamedSharding))))
      out[preset] = dict(
          params=count_params(state), bytes=param_bytes(state),
          replicated=sharding.replicated_fraction(state, shardings),
          opt_leaves=len(moments), mu_matches_params=same,
          devices=len(jax.devices()), mesh=dict(mesh.shape),
          gate_spec=str(state['llama']['layers']['gate']['kernel'].sharding.spec))
    print('RESULT' + json.dumps(out))
''')


@pytest.mark.slow
def test_radfm_13b_sharding_on_64_devices():
  env = dict(os.environ, XLA_FLAGS=cd.xla_flags(64),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][0]
  result = json.loads(line[len('RESULT'):])
  for preset, r in result.items():
    assert r['devices'] == 64
    assert r['params'] == 13_123_822_336            # the official inference parameters
    assert r['replicated'] <= 0.02, (preset, r['replicated'])
    assert r['mu_matches_params'], preset
  assert result['fsdp']['mesh'] == {'data': 1, 'fsdp': 64, 'tensor': 1}
  assert result['fsdp']['gate_spec'] == "P(None, 'fsdp', None)"
  assert result['fsdp_tp']['mesh'] == {'data': 1, 'fsdp': 16, 'tensor': 4}
  assert result['fsdp_tp']['gate_spec'] == "P(None, 'fsdp', 'tensor')"
