"""Optax chains, learning-rate schedule, weight-decay and freeze masks.

    trainable, frozen = split_trainable(params, cfg.train.freeze)
    tx = make_optimizer(cfg.train, trainable)
    opt_state = tx.init(trainable)

The optimizer only ever sees the *trainable* part of the parameters: frozen towers get neither
gradients (the step differentiates w.r.t. the trainable state only, so XLA never builds their
backward pass) nor optimizer moments (no memory spent on them), and they are bit-for-bit unchanged
by a step.

Chain: clip_by_global_norm(max_grad_norm) -> AdamW(schedule, b1, b2, eps, weight_decay, mask).
Schedule: linear warmup 0 -> learning_rate over `TrainConfig.warmup` steps (`warmup_steps`, or
min(100, steps // 10) when it is -1), then cosine decay to
learning_rate * min_lr_ratio at `steps`.

Weight-decay mask (`decay_mask`): decay applies to matmul kernels only, i.e. every parameter named
`kernel` (q/k/v/o, MLPs, the patch projection, fc, lm_head). No decay on norm scales, biases,
embedding / lookup tables (`llama.embed_tokens`, `figure_tokens`), the ViT position tables
(`pos_row/col/dep`) or the Perceiver `latents` - the usual GPT/LLaMA practice. Decided by name, not
by rank, because stacked layers give every parameter an extra leading `layers` axis.
"""

from __future__ import annotations

from typing import Sequence

import jax
import optax
from flax import nnx

from radfm_jax.config import FREEZE_GROUPS, TrainConfig


def frozen_prefixes(freeze: Sequence[str]) -> tuple[str, ...]:
  """Top-level module names frozen by the `train.freeze` entries (aliases expanded)."""
  out = []
  for name in freeze:
    for module in FREEZE_GROUPS[name]:
      if module not in out:
        out.append(module)
  return tuple(out)


def trainable_filter(freeze: Sequence[str]):
  """An NNX filter `(path, value) -> bool` selecting the parameters that train."""
  frozen = frozen_prefixes(freeze)

  def is_trainable(path, _value) -> bool:
    return str(path[0]) not in frozen
  return is_trainable


def split_trainable(params: nnx.State, freeze: Sequence[str]) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) parts of a parameter State; `nnx.merge_state(t, f)` puts them back."""
  return nnx.split_state(params, trainable_filter(freeze), ...)


def merge_params(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
  return nnx.merge_state(trainable, frozen)


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return [n for n in names if n != 'value']


def decay_mask(params) -> object:
  """Tree of bools like `params`: True on matmul kernels (see the module docstring)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[-1] == 'kernel', params)


def make_schedule(t: TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup,
      decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio)


def make_optimizer(t: TrainConfig, trainable_params) -> optax.GradientTransformation:
  """The AdamW chain for the trainable parameters (their tree fixes the decay mask's structure)."""
  parts = []
  if t.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(t.max_grad_norm))
  parts.append(optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=decay_mask(trainable_params)))
  return optax.chain(*parts)


__all__ = ['decay_mask', 'frozen_prefixes', 'make_optimizer', 'make_schedule', 'merge_params',
           'split_trainable', 'trainable_filter']
