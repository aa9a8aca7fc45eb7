"""benchmarks/xla_profile.py: the per-op XLA:CPU profile of a real `tiny` train step sums to about
the step's wall time, and every traced op is found in the compiled HLO and categorised; the
benchmarks' interleaved comparisons put every variant in every slot."""

import jax
import pytest
from flax import nnx

import conftest_data as cd
from radfm_jax.config import model_config
from radfm_jax.models.radfm import create_model

xla_profile = cd.import_benchmark('xla_profile')
rotated = cd.import_benchmark('common').rotated
train_step = cd.import_benchmark('train_step')


@pytest.mark.slow                     # ~45 s: compiles and traces a real tiny train step
@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the XLA:CPU trace format')
def test_profile_of_tiny_train_step_sums_to_the_step(tmp_path):
  cfg = model_config('tiny', remat_policy='none', compute_dtype='float32')
  batch = train_step.make_batch(cfg, shape=(64, 64, 16), length=64)
  graphdef, params, rest = nnx.split(create_model(cfg, seed=0), nnx.Param, ...)
  step = jax.jit(jax.value_and_grad(train_step.loss_fn), static_argnums=1)
  args = (params, graphdef, rest, batch, jax.random.key(0))
  times, wall, hlo = xla_profile.profile(step, args, str(tmp_path), steps=3)
  cats = xla_profile.by_category(times, hlo)
  summed = sum(cats.values())
  # Self times: each op once, loops not double-counted. The tiny step runs mostly one op at a
  # time, so the sum lies near the wall time (below it by the runtime's dispatch gaps).
  assert 0.4 * wall < summed < 1.3 * wall, (summed, wall)
  assert sum(times.values()) == pytest.approx(summed)
  # Every traced op is an instruction of the compiled module; the step has matmuls, norms and
  # the layer scan's loop.
  ops = hlo[next(iter(hlo))]
  missing = [name for _, name in times if name not in ops]
  assert not missing and cats['other'] == 0.0, missing[:5]
  assert cats['matmul/conv'] > 0 and cats['reductions/norms'] > 0 and cats['loop control'] > 0
  assert cats['collectives'] == 0.0                     # one device
  text = xla_profile.report(cats, wall, 'step', times, hlo)
  assert f'ops sum {summed * 1e3:.1f} ms vs wall {wall * 1e3:.1f} ms' in text


def test_categories_from_compiled_hlo():
  def fn(a, b):
    return jax.nn.softmax(a @ b, axis=-1).T + 1.0

  x = jax.numpy.ones((64, 64))
  ops = xla_profile.parse_hlo(jax.jit(fn).lower(x, x).compile().as_text())
  cats = {xla_profile.category(v) for v in ops.values()}
  assert 'matmul/conv' in cats
  assert xla_profile.category({'fusion', 'exponential', 'reduce', 'divide'}) == 'softmax'
  assert xla_profile.category({'fusion', 'copy', 'transpose', 'parameter'}) == 'copies/transposes'
  assert xla_profile.category({'while'}) == 'loop control'
  assert xla_profile.category({'all-reduce', 'add'}) == 'collectives'
  assert xla_profile.category(None) == 'other'


def test_interleaved_rounds_rotate_the_variants():
  names = ['float32', 'float32:xla', 'bfloat16']
  rounds = [rotated(names, r) for r in range(6)]
  assert rounds[0] == names and rounds[1] == ['float32:xla', 'bfloat16', 'float32']
  assert rounds[3] == names                               # period: the number of variants
  for slot in range(len(names)):                          # each variant once in each slot
    assert sorted(r[slot] for r in rounds[:3]) == sorted(names)
  assert rotated({'a': 1, 'b': 2}, 1) == ['b', 'a']       # a dict's keys, as the scripts pass
  assert rotated([], 4) == []
