"""LoRA / QLoRA through Qwix on `tiny` (scanned layers), merge, export, per-module learning rates."""

import contextlib
import io
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from radfm_jax import checkpoint, sharding
from radfm_jax.cli.main import main
from radfm_jax.config import ConfigError, MeshConfig, load_config
from radfm_jax.convert import engine, keymap
from radfm_jax.errors import InputError
from radfm_jax.models import lora
from radfm_jax.models.radfm import create_model
from radfm_jax.train import loop, optim
from radfm_jax.train import step as step_lib
from radfm_jax.train.synthetic import SyntheticBatches

# One worker: the module's two shared trainings (`runs`) and their compiled steps are made once.
pytestmark = pytest.mark.xdist_group('lora')

OVERRIDES = ['data.store=synthetic', 'train.steps=8', 'train.warmup_steps=0',
             'train.learning_rate=2e-2', 'train.checkpoint_every=0', 'train.tensorboard=False',
             'train.async_checkpoint=False', 'model.vision.dropout=0.0', 'data.batch_size_2d=8',
             'finetune.rank=4']


def _cfg(method='lora', *extra):
  return load_config(f'radfm:model=tiny,finetune={method}', OVERRIDES + list(extra))


def _flat(state):
  return {'/'.join(lora.path_names(p)): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(state)}


def _inputs(cfg):
  batch = next(SyntheticBatches(cfg))
  return batch, (batch['tokens'], batch['images'])


def test_presets_and_fields():
  cfg = _cfg('qlora', 'finetune.quant=int4')
  assert (cfg.finetune.method, cfg.finetune.quant, cfg.finetune.rank) == ('qlora', 'int4', 4)
  assert cfg.finetune.targets == (r'llama/layers/(q|k|v|o|gate|up|down)',)
  assert load_config('radfm:model=tiny').finetune.method == 'full'
  with pytest.raises(ConfigError, match=r"config field finetune.quant='int3': expected 'int8'"):
    _cfg('lora', 'finetune.quant=int3')
  with pytest.raises(ConfigError, match=r'finetune.train_full=\[.vison.\]: expected names from'):
    _cfg('lora', 'finetune.train_full=vison')
  with pytest.raises(ConfigError, match=r'train.lr_multipliers=.*expected \(regex, multiplier'):
    _cfg('lora', "train.lr_multipliers=[['vision/.*', -1.0]]")


def test_unmatched_target_is_a_config_error():
  """Raised where a run builds its model (`loop.build`: the abstract adapted model, traced, no
  eager initialisation)."""
  cfg = _cfg('lora', "finetune.targets=['llama/layers/qq']")
  with pytest.raises(ConfigError, match=r"pattern 'llama/layers/qq' matches no matmul"):
    lora.abstract_model(cfg.model, cfg.finetune)


@pytest.mark.parametrize('method,quant', [('lora', None), ('qlora', 'int8'), ('qlora', 'int4')])
def test_adapters_on_scanned_layers(method, quant):
  extra = [f'finetune.quant={quant}'] if quant else []
  cfg = _cfg(method, "finetune.targets=['llama/layers/(q|k|v|o|gate|up|down)', 'vision/blocks/q']",
             *extra)
  base = create_model(cfg.model, seed=1)
  batch, inputs = _inputs(cfg)
  adapted = lora.add_adapters(base, cfg.finetune, seed=2)
  a = adapted.llama.layers.gate.kernel_lora_a[...]
  b = adapted.llama.layers.gate.kernel_lora_b[...]
  assert a.shape == (2, 64, 4) and b.shape == (2, 4, 128)       # [layers, in, rank], [.., out]
  assert adapted.vision.blocks.q.kernel_lora_a[...].shape == (2, 48, 4)
  assert not np.any(np.asarray(b)) and np.std(np.asarray(a)) > 0
  assert not hasattr(adapted.llama.lm_head, 'kernel_lora_a')
  want, got = base(*inputs), adapted(*inputs)
  if method == 'lora':
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))   # b = 0: the base model
  else:
    q = adapted.llama.layers.q.kernel.array.qvalue[...]
    assert q.dtype == jnp.dtype(quant) and q.shape == (2, 64, 4, 16)
    assert float(jnp.abs(got - want).max()) < (0.05 if quant == 'int8' else 0.5)
  # The Python layer loop (scan_layers=False) runs the same adapted parameters.
  adapted.set_attributes(scan_layers=False, raise_if_not_found=False)
  np.testing.assert_allclose(np.asarray(adapted(*inputs)), np.asarray(got), atol=1e-5)


def _train(cfg, workdir, batch, steps=None, mesh=None):
  return loop.train(cfg, str(workdir), data=itertools.repeat(batch), max_steps=steps,
                    mesh=mesh, progress=False)


# Adapters on the decoder's projections and on fc (a kernel outside the stacked layers).
TARGETS = "finetune.targets=['llama/layers/(q|k|v|o|gate|up|down)', 'fc']"


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """`runs(method)`: one 8-step run of `method` on one fixed batch (8 devices), trained once and
  shared by the tests below: a dict with cfg, batch, inputs, the initial and final parameters,
  the losses, the run's stderr and workdir."""
  done = {}

  def get(method):
    if method not in done:
      cfg = _cfg(method, TARGETS)
      mesh, rules, _, tx, _, shardings = loop.build(cfg)
      before = _flat(loop.init_state(cfg, mesh, rules, tx, shardings).params)
      batch, inputs = _inputs(cfg)
      workdir = tmp_path_factory.mktemp(method)
      err = io.StringIO()
      with contextlib.redirect_stderr(err):
        result = _train(cfg, workdir, batch)
      done[method] = dict(cfg=cfg, batch=batch, inputs=inputs, before=before, result=result,
                          stderr=err.getvalue(), workdir=workdir)
    return done[method]
  return get


@pytest.mark.slow
@pytest.mark.parametrize('method', ['lora', 'qlora'])
def test_training_moves_only_adapters(runs, method):
  run = runs(method)
  result = run['result']
  after = _flat(result.state.params)
  # The start-up summary counts the adapters as what trains (9,152 values for tiny at rank 4:
  # 8,704 on the decoder, 448 on fc).
  adapters = sum(v.size for k, v in after.items() if k.endswith(('_lora_a', '_lora_b')))
  assert adapters == lora.adapter_count(result.state.params) == 9152
  summary = [line for line in run['stderr'].splitlines()
             if line.startswith('radfm-jax train: model tiny: ')]
  assert len(summary) == 1 and (
      f'parameters ({adapters / 1e6:.2f}M trainable: {adapters:,} in {method} adapters of rank 4)'
      in summary[0]), summary
  before = run['before']
  assert set(before) == set(after)
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  assert moved and all(k.endswith(('_lora_a', '_lora_b')) for k in moved), sorted(moved)[:5]
  assert any(k.endswith('_lora_b') for k in moved)
  if method == 'qlora':
    assert after['llama/layers/q/kernel/array/qvalue'].dtype == np.int8
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert sorted(result.losses) == list(range(1, 9))
  assert losses[-1] < losses[0] - 0.04, losses           # a fixed batch: the adapters fit it
  # Adapters (and their Adam moments) are sharded like their kernels on the 8-device mesh.
  lora_a = result.state.params['llama']['layers']['gate']['kernel_lora_a']
  assert lora_a[...].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', None)


@pytest.mark.slow
def test_exact_resume_qlora(runs, tmp_path):
  """2 steps, then a fresh process state (compiled steps and initial states forgotten) resumes to
  step 8: the losses of steps 3-8 and every parameter equal the shared straight 8-step run's."""
  straight = runs('qlora')
  cfg, batch = straight['cfg'], straight['batch']
  _train(cfg, tmp_path / 'resumed', batch, steps=2)
  loop._JITTED.clear()
  loop._INIT.clear()
  resumed = _train(cfg, tmp_path / 'resumed', batch)
  assert sorted(resumed.losses) == list(range(3, 9))
  assert [resumed.losses[s] for s in range(3, 9)] == [
      straight['result'].losses[s] for s in range(3, 9)]
  got, want = _flat(resumed.state.params), _flat(straight['result'].state.params)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_sharded_equals_single_device(tmp_path):
  cfg = _cfg('lora')
  batch, _ = _inputs(cfg)
  eight = _train(cfg, tmp_path / 'eight', batch, steps=3)
  one = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
  single = _train(cfg, tmp_path / 'one', batch, steps=3, mesh=one)
  assert eight.state.params['llama']['layers']['q']['kernel_lora_a'][...].sharding.num_devices == 8
  got, want = _flat(eight.state.params), _flat(single.state.params)
  adapters = [k for k in got if k.endswith(('_lora_a', '_lora_b'))]
  assert len(adapters) == 14                  # 7 decoder projections x (a, b)
  for key in adapters:
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order differences of ~1e-7
    # move single entries by ~1e-4 of the tensor's scale; compare against that scale.
    scale = np.abs(want[key]).max()
    assert scale > 0 and np.abs(got[key] - want[key]).max() <= 2e-3 * scale, key
  np.testing.assert_allclose([eight.losses[s] for s in (1, 2, 3)],
                             [single.losses[s] for s in (1, 2, 3)], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['lora', 'qlora'])
def test_merge_logits_and_export(runs, tmp_path, method):
  run = runs(method)
  cfg, batch, inputs = run['cfg'], run['batch'], run['inputs']
  graphdef = loop.build(cfg)[2]
  adapted = nnx.merge(graphdef, jax.device_get(run['result'].state.params))
  merged = lora.merge(adapted, cfg.finetune)
  assert not any(k.endswith(('_lora_a', '_lora_b')) for k in _flat(nnx.state(merged)))
  want = adapted(*inputs, attention_mask=batch['attention_mask'], image_mask=batch['image_mask'])
  got = merged(*inputs, attention_mask=batch['attention_mask'], image_mask=batch['image_mask'])
  assert np.abs(np.asarray(adapted.llama.layers.q.kernel_lora_b[...])).max() > 0   # trained
  assert np.abs(np.asarray(adapted.fc.kernel_lora_b[...])).max() > 0
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  # The CLI: merge the run, then export the official keys.
  assert main(['merge', '--checkpoint', str(run['workdir']), '--out', str(tmp_path / 'm')]) == 0
  record = json.load(open(tmp_path / 'm' / 'config.json'))     # where it came from, in full
  assert record['merged_from'] == os.path.abspath(run['workdir'])
  loaded, _ = checkpoint.load(str(tmp_path / 'm'))
  np.testing.assert_allclose(np.asarray(loaded(*inputs, attention_mask=batch['attention_mask'],
                                               image_mask=batch['image_mask'])),
                             np.asarray(want), atol=1e-5, rtol=1e-5)
  out = tmp_path / 'model.safetensors'
  assert main(['convert', 'to-torch', '--checkpoint', str(tmp_path / 'm'), '--out', str(out)]) == 0
  from safetensors.numpy import load_file
  back = load_file(str(out))
  expected = engine.state_dict_of(merged, keymap.radfm_table())
  assert set(back) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(back[key], value, atol=1e-6, err_msg=key)
  # A LoRA run is never exported as its bare base weights.
  with pytest.raises(InputError, match='radfm-jax merge --checkpoint'):
    checkpoint.LeafReader(str(run['workdir']))


def test_merge_refuses_a_full_run(tmp_path, capsys):
  cfg = load_config('radfm:model=tiny', [o for o in OVERRIDES if not o.startswith('finetune.')])
  batch, _ = _inputs(cfg)
  _train(cfg, tmp_path / 'full', batch, steps=0)       # its step-0 checkpoint: no step compiled
  assert main(['merge', '--checkpoint', str(tmp_path / 'full'), '--out', str(tmp_path / 'm')]) == 2
  assert 'finetune.method is full (no adapters to merge)' in capsys.readouterr().err


def test_lr_multipliers_scale_the_updates():
  cfg = load_config('radfm:model=tiny', ["train.lr_multipliers=[['vision/.*', 10.0], "
                                         "['perceiver/.*', 10.0]]", 'train.warmup_steps=0',
                                         'train.max_grad_norm=0.0', 'train.weight_decay=0.1'])
  plain = load_config('radfm:model=tiny', ['train.warmup_steps=0', 'train.max_grad_norm=0.0',
                                           'train.weight_decay=0.1'])
  # The model's parameter tree (traced, not initialised op by op) filled with random values:
  # what the multipliers scale does not depend on the values.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(a.dtype),
                        nnx.state(nnx.eval_shape(lambda: create_model(cfg.model)), nnx.Param))
  grads = jax.tree.map(lambda p: np.float32(0.01) * np.sign(p + 0.5), params)
  labels = _flat(optim.lr_labels(cfg.train.lr_multipliers, params))
  assert labels['vision/blocks/q/kernel'] == 'g0' and labels['perceiver/latents'] == 'g1'
  assert labels['llama/layers/q/kernel'] == 'base' and labels['fc/kernel'] == 'base'
  tx, tx_plain = optim.make_optimizer(cfg.train, params), optim.make_optimizer(plain.train, params)
  state = tx.init(params)
  # One AdamW's moments (same shapes as without multipliers) + the multi_transform's own state.
  moments = jax.tree.map(np.shape, state[0][0].mu)
  assert moments == jax.tree.map(np.shape, tx_plain.init(params)[0][0].mu)
  assert set(state[1].inner_states) == {'base', 'g0', 'g1'}
  update, update_plain = jax.jit(tx.update), jax.jit(tx_plain.update)    # not op by op
  for _ in range(2):
    updates, state = update(grads, state, params)
  plain_state = tx_plain.init(params)
  for _ in range(2):
    plain_updates, plain_state = update_plain(grads, plain_state, params)
  got, want = _flat(updates), _flat(plain_updates)
  for key in got:
    scale = 10.0 if key.startswith(('vision/', 'perceiver/')) else 1.0
    np.testing.assert_allclose(got[key], scale * want[key], rtol=1e-6, err_msg=key)
  assert np.abs(got['vision/blocks/q/kernel']).max() > 0


def test_lr_multipliers_with_lora_train_full():
  cfg = _cfg('lora', 'finetune.train_full=perceiver', "train.lr_multipliers=[['perceiver/.*', 10.0]]")
  graphdef, abstract = lora.abstract_model(cfg.model, cfg.finetune)
  trainable, _ = optim.split_trainable(abstract, optim.trainable_spec(cfg))
  names = set(_flat(jax.tree.map(lambda x: np.zeros(()), trainable)))
  assert 'perceiver/latents' in names and 'llama/layers/q/kernel_lora_a' in names
  assert not any(n.startswith(('vision/', 'fc/')) or n.endswith('/kernel') and
                 n.startswith('llama/') for n in names)
  labels = _flat(optim.lr_labels(cfg.train.lr_multipliers, trainable))
  assert {str(labels[n]) for n in names if n.startswith('perceiver/')} == {'g0'}
  tx = optim.make_optimizer(cfg.train, trainable)
  step_lib.abstract_train_state((graphdef, abstract), tx, sharding.make_mesh(cfg.mesh),
                                sharding.rules_for(cfg.mesh), optim.trainable_spec(cfg))


def test_adapters_build_with_splash_on_the_mesh():
  """The adapters' first call runs with XLA attention: the splash kernel shards its batch over
  the 8-device mesh, which the one example row does not divide (this failed before); the model
  then runs with the configured splash attention."""
  cfg = _cfg('lora', 'model.attention=splash')
  mesh = sharding.make_mesh(cfg.mesh)
  assert mesh.devices.size == 8
  graphdef, abstract = lora.abstract_model(cfg.model, cfg.finetune, mesh,
                                           sharding.rules_for(cfg.mesh))
  model = nnx.merge(graphdef, abstract)
  assert model.llama.layers.attention_impl == 'splash'
  assert model.llama.layers.q.flat_matmul and model.llama.layers.q.kernel_lora_a.shape == (2, 64, 4)


def test_merge_refuses_a_run_whose_finetune_section_was_edited(tmp_path, capsys):
  """The restore is partial, so a finetune.targets narrowed by hand in config.json merged only
  the adapters it still named, dropping the others (exit 0); a method Qwix does not know was a
  KeyError's traceback. Each is one line now."""
  import json
  import shutil
  cfg = _cfg('lora', TARGETS)
  batch, _ = _inputs(cfg)
  _train(cfg, tmp_path / 'run', batch, steps=0)        # its step-0 checkpoint: no step compiled
  capsys.readouterr()                                   # the run's own lines
  config_path = tmp_path / 'run' / 'checkpoints' / 'config.json'
  record = json.loads(config_path.read_text())

  def merge_edited(name, **finetune):
    shutil.copytree(tmp_path / 'run', tmp_path / name)
    (tmp_path / name / 'checkpoints' / 'config.json').write_text(json.dumps(
        dict(record, finetune=dict(record['finetune'], **finetune))))
    rc = main(['merge', '--checkpoint', str(tmp_path / name), '--out', str(tmp_path / 'm')])
    return rc, capsys.readouterr().err.strip().splitlines()

  rc, err = merge_edited('narrowed', targets=['llama/layers/(q|k)'])
  assert rc == 2 and len(err) == 1, err
  assert 'holds 12 parameters that the config.json beside it does not describe (e.g. ' \
      'fc/kernel_lora_a)' in err[0], err
  rc, err = merge_edited('dora', method='dora')
  assert (rc, err) == (2, [f"radfm-jax merge: {tmp_path}/dora/checkpoints/config.json: config "
                           "field finetune.method='dora': expected 'full', 'lora' or 'qlora'"])
  assert not (tmp_path / 'm').exists()
  assert main(['merge', '--checkpoint', str(tmp_path / 'run'), '--out', str(tmp_path / 'm')]) == 0
