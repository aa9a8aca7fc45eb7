"""`radfm-jax train`: train or fine-tune from a config (library: `radfm_jax.train.loop.train`)."""

from __future__ import annotations

import json
import math
import sys

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax train --config configs/radfm.py:model=small,mesh=cpu --workdir runs/small \\
    --config.train.steps=2000 --config.data.store=store/ --config.data.tokenizer=tokenizer.model"""


def add_parser(sub):
  p = flags.add_command(
      sub, 'train', help='train or fine-tune from a config',
      description='Trains (or resumes from the latest checkpoint in --workdir) until train.steps. '
      'Writes checkpoints/, config.json, metrics.jsonl and tensorboard/ in --workdir and prints '
      'one JSON summary line. SIGTERM / SIGINT save a checkpoint and exit 0; a non-finite loss '
      'exits 3 (the last good checkpoint stays intact).', example=EXAMPLE)
  p.add_argument('--workdir', required=True, help='checkpoints, metrics and config go here')
  p.add_argument('--max-steps', type=int, default=None,
                 help='stop after this many optimizer steps in total (default: train.steps)')
  p.add_argument('--no-progress', action='store_true', help='no tqdm progress bar')
  p.add_argument('--no-fallback', action='store_true',
                 help='if the latest checkpoint does not restore, stop with its file and reason '
                 '(exit 2) instead of resuming from the newest intact one')
  flags.add_config_arguments(p, required=True, help='experiment config, e.g. '
                             'configs/radfm.py:model=<size>,mesh=<preset>')
  return p


def run(args) -> int:
  from radfm_jax.config import check_batch_axes, load_config
  cfg = load_config(args.config, args.overrides)     # a bad value fails before JAX starts
  from radfm_jax import launch
  launch.initialize()
  import jax
  # Before the model is built: the synthetic source batches data.batch_size_2d only.
  check_batch_axes(cfg, jax.device_count(), jax.process_count(),
                   ('2d', '3d') if cfg.data.store else ('2d',))

  from radfm_jax.train.loop import NonFiniteLossError, train
  try:
    result = train(cfg, args.workdir, max_steps=args.max_steps, progress=not args.no_progress,
                   fallback=not args.no_fallback)
  except NonFiniteLossError as e:
    print(f'radfm-jax train: {e}', file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    last = result.losses[max(result.losses)] if result.losses else math.nan
    print(json.dumps({'status': result.status, 'step': result.step, 'last_loss': last,
                      'checkpoint': result.last_checkpoint}))
  return 0
