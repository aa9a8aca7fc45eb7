"""train.lr_delays: matching parameters hold still for their first steps, then ramp up."""

import jax
import numpy as np
import pytest
from flax import nnx

from radfm_jax.config import ConfigError, load_config
from radfm_jax.models import lora
from radfm_jax.models.radfm import create_model
from radfm_jax.train import optim

BASE = ['train.warmup_steps=2', 'train.max_grad_norm=0.0', 'train.weight_decay=0.1']


def _flat(state):
  return {'/'.join(lora.path_names(p)): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_delayed_modules_wait_then_ramp_to_the_plain_updates():
  cfg = load_config('radfm:model=tiny', BASE + ["train.lr_delays=[['llama/layers/.*', 2]]"])
  plain = load_config('radfm:model=tiny', BASE)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(a.dtype),
                        nnx.state(nnx.eval_shape(lambda: create_model(cfg.model)), nnx.Param))
  grads = jax.tree.map(lambda p: np.float32(0.01) * np.sign(p + 0.5), params)
  tx, tx_plain = optim.make_optimizer(cfg.train, params), optim.make_optimizer(plain.train, params)
  state, plain_state = tx.init(params), tx_plain.init(params)
  update, update_plain = jax.jit(tx.update), jax.jit(tx_plain.update)
  # Update count 0, 1: held (0); 2: half way through the 2-step ramp; 3, 4: the plain update.
  for count, factor in enumerate([0.0, 0.0, 0.5, 1.0, 1.0]):
    updates, state = update(grads, state, params)
    want_all, plain_state = update_plain(grads, plain_state, params)
    got, want = _flat(updates), _flat(want_all)
    for key in got:
      scale = factor if key.startswith('llama/layers/') else 1.0
      np.testing.assert_allclose(got[key], scale * want[key], rtol=1e-6,
                                 err_msg=f'{key} at update {count}')
    if count >= 1:     # the schedule's own warm-up makes every update 0 at count 0
      assert np.abs(want['llama/layers/q/kernel']).max() > 0
      assert np.abs(got['vision/blocks/q/kernel']).max() > 0
    if factor == 0.0:  # held means bit-for-bit unchanged, weight decay included
      assert not np.any(got['llama/layers/q/kernel'])
      assert not np.any(got['llama/layers/input_norm/scale'])


def test_delay_ramp_values():
  cfg = load_config('radfm:model=tiny', BASE + ["train.lr_delays=[['llama/.*', 0]]",
                                                 'train.warmup_steps=0'])
  assert float(optim.delay_ramp(0, 0)(0)) == 1.0
  assert [float(optim.delay_ramp(3, cfg.train.warmup)(c)) for c in range(5)] == [0, 0, 0, 1, 1]
  assert [float(optim.delay_ramp(1, 4)(c)) for c in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]


@pytest.mark.parametrize('value', ["[['llama/.*', -1]]", "[['llama/(', 3]]", "[['llama/.*', 2.5]]"])
def test_bad_lr_delays_name_the_field(value):
  with pytest.raises(ConfigError, match=r'train.lr_delays=.*expected \(regex, steps\) pairs'):
    load_config('radfm:model=tiny', [f'train.lr_delays={value}'])


@pytest.mark.parametrize('field', ['lr_multipliers', 'lr_delays'])
def test_a_pattern_matching_no_parameter_names_the_field(field):
  """A misspelt pattern (before: accepted, the learning rates left as they were, silently); one
  that matches only frozen parameters stays allowed."""
  cfg = load_config('radfm:model=tiny', [f"train.{field}=[['vison/.*', 2]]"])
  params = nnx.state(nnx.eval_shape(lambda: create_model(cfg.model)), nnx.Param)
  with pytest.raises(ConfigError) as e:
    optim.check_patterns(cfg.train, params)
  assert str(e.value) == (
      f"config field train.{field}=[['vison/.*', 2]]: pattern 'vison/.*' matches no parameter; "
      'expected full matches of parameter paths such as vision/blocks/q/kernel, '
      'perceiver/layers/ff_in/kernel, fc/kernel, llama/layers/q/kernel')
  frozen = load_config('radfm:model=tiny', [f"train.{field}=[['vision/.*', 2]]",
                                            "train.freeze=['vision']"])
  optim.check_patterns(frozen.train, params)


def test_a_missing_init_from_names_the_field(tmp_path):
  from radfm_jax.errors import InputError
  from radfm_jax.train import loop
  cfg = load_config('radfm:model=tiny', ['finetune.method=lora',
                                         f'finetune.init_from={tmp_path}/none'])
  with pytest.raises(InputError) as e:
    loop.base_params(cfg, None, None)
  assert str(e.value) == (f'config field finetune.init_from: {tmp_path}/none: not a checkpoint (no '
                          'such folder); expected a checkpoint folder written by radfm_jax.save, '
                          'radfm-jax train or radfm-jax convert')
