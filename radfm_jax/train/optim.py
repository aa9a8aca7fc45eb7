"""Optax chains, learning-rate schedule, weight-decay and freeze masks.

    trainable, frozen = split_trainable(params, trainable_spec(cfg))
    tx = make_optimizer(cfg.train, trainable)
    opt_state = tx.init(trainable)

The optimizer only ever sees the *trainable* part of the parameters: frozen towers get neither
gradients (the step differentiates w.r.t. the trainable state only, so XLA never builds their
backward pass) nor optimizer moments (no memory spent on them), and they are bit-for-bit unchanged
by a step.

Chain: clip_by_global_norm(max_grad_norm) -> AdamW(schedule, b1, b2, eps, weight_decay, mask).
Per-module learning rates (`train.lr_multipliers`, (regex, multiplier) pairs): the AdamW update of
a parameter whose path (`vision/blocks/q/kernel`) fully matches a pattern (first match wins) is
scaled by its multiplier (`optax.multi_transform` over `optax.scale`, after AdamW), which is
exactly AdamW at learning_rate * multiplier (its weight decay is scaled by the learning rate too);
the moments are those of one AdamW, so the optimizer state does not change shape.
Delayed modules (`train.lr_delays`, (regex, steps) pairs, same matching): the update of a matching
parameter is scaled by 0 for its first `steps` updates, then by a linear ramp reaching 1 after
`warmup` more (`optax.scale_by_schedule` after AdamW, so weight decay waits too). Its AdamW
moments accumulate from step 0, so it starts from warm moments. This is a warm-up phase of the
other towers, e.g. the image path trained while the decoder's layers hold still.

LoRA / QLoRA (`finetune.method`, models/lora.py): only the adapters (`*_lora_a`, `*_lora_b`) and
the towers named in `finetune.train_full` train (minus `train.freeze`); `trainable_spec(cfg)` is
what `split_trainable` takes for either kind of run.

Schedule: linear warmup 0 -> learning_rate over `TrainConfig.warmup` steps (`warmup_steps`, or
min(100, steps // 10) when it is -1), then cosine decay to learning_rate * min_lr_ratio at `steps`.

Weight-decay mask (`decay_mask`): decay applies to matmul kernels only, i.e. every parameter named
`kernel` (q/k/v/o, MLPs, the patch projection, fc, lm_head) and the LoRA adapters of kernels. No
decay on norm scales, biases, embedding / lookup tables (`llama.embed_tokens`, `figure_tokens`),
the ViT position tables (`pos_row/col/dep`) or the Perceiver `latents` - the usual GPT/LLaMA
practice. Decided by name, not by rank, because stacked layers give every parameter an extra
leading `layers` axis.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from radfm_jax.config import FREEZE_GROUPS, Config, ConfigError, TrainConfig
from radfm_jax.models.lora import ADAPTER_SUFFIXES, path_names, trainable_filter as lora_filter


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


def trainable_spec(cfg: Config):
  """What trains in a run, as `split_trainable` takes it: the `train.freeze` names for a `full`
  run, else a filter selecting the LoRA adapters and the `finetune.train_full` towers (minus
  `train.freeze`)."""
  if cfg.finetune.method == 'full':
    return tuple(cfg.train.freeze)
  adapters_or_full = lora_filter(cfg.finetune)
  not_frozen = trainable_filter(cfg.train.freeze)
  return lambda path, value: adapters_or_full(path, value) and not_frozen(path, value)


def split_trainable(params: nnx.State, freeze) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) parts of a parameter State; `nnx.merge_state(t, f)` puts them back.
  `freeze`: `train.freeze` names, or a filter from `trainable_spec`."""
  return nnx.split_state(params, freeze if callable(freeze) else trainable_filter(freeze), ...)


def merge_params(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
  return nnx.merge_state(trainable, frozen)


def decay_mask(params) -> object:
  """Tree of bools like `params`: True on matmul kernels and their adapters (module docstring)."""
  kernels = ('kernel',) + tuple('kernel' + s for s in ADAPTER_SUFFIXES)
  return jax.tree_util.tree_map_with_path(lambda p, _: path_names(p)[-1] in kernels, params)


def lr_labels(multipliers, params) -> object:
  """Tree of labels like `params`: 'g<i>' for the first (pattern, multiplier) pair whose pattern
  fully matches the parameter's path, 'base' where none does."""
  compiled = [re.compile(pattern) for pattern, _ in multipliers]

  def label(path, _):
    name = '/'.join(path_names(path))
    return next((f'g{i}' for i, c in enumerate(compiled) if c.fullmatch(name)), 'base')
  return jax.tree_util.tree_map_with_path(label, params)


def check_trainable(cfg: Config, trainable) -> None:
  """ConfigError naming `train.freeze` when it (with `finetune.*`) leaves no parameter to train:
  the optimizer would have nothing to update (XLA: 'Need at least one array to stack')."""
  if not jax.tree.leaves(trainable):
    what = ('' if cfg.finetune.method == 'full' else
            f' (finetune.method={cfg.finetune.method!r}: its adapters and '
            f'finetune.train_full={list(cfg.finetune.train_full)!r})')
    raise ConfigError(f'config field train.freeze={list(cfg.train.freeze)!r}: freezes every '
                      f'parameter the run would train{what}; expected some left to train')


def check_patterns(t: TrainConfig, params) -> None:
  """ConfigError naming `train.lr_multipliers` / `train.lr_delays` when one of their patterns
  fully matches no parameter path of the model: a misspelt one would leave the learning rates
  as they were, silently. (A pattern that matches only frozen parameters is allowed.)"""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ['/'.join(path_names(path)) for path, _ in leaves]
  for field in ('lr_multipliers', 'lr_delays'):
    pairs = getattr(t, field)
    for pattern, _ in pairs:
      if not any(re.fullmatch(pattern, name) for name in names):
        raise ConfigError(f'config field train.{field}={[list(p) for p in pairs]!r}: pattern '
                          f'{pattern!r} matches no parameter; expected full matches of parameter '
                          'paths such as vision/blocks/q/kernel, perceiver/layers/ff_in/kernel, '
                          'fc/kernel, llama/layers/q/kernel')


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
  if t.lr_multipliers:
    scales = {f'g{i}': optax.scale(float(m)) for i, (_, m) in enumerate(t.lr_multipliers)}
    parts.append(optax.multi_transform({'base': optax.identity(), **scales},
                                       lr_labels(t.lr_multipliers, trainable_params)))
  if t.lr_delays:
    delays = {f'g{i}': optax.scale_by_schedule(delay_ramp(int(n), t.warmup))
              for i, (_, n) in enumerate(t.lr_delays)}
    parts.append(optax.multi_transform({'base': optax.identity(), **delays},
                                       lr_labels(t.lr_delays, trainable_params)))
  return optax.chain(*parts)


def delay_ramp(delay: int, warmup: int) -> optax.Schedule:
  """Update count -> factor: 0 for the first `delay` updates, then a linear ramp reaching 1 after
  `warmup` more (at once when warmup is 0)."""
  def factor(count):
    return jnp.clip((count - delay + 1) / max(warmup, 1), 0.0, 1.0)
  return factor


__all__ = ['check_patterns', 'check_trainable', 'decay_mask', 'delay_ramp', 'frozen_prefixes',
           'lr_labels', 'make_optimizer', 'make_schedule', 'merge_params', 'split_trainable',
           'trainable_filter', 'trainable_spec']
