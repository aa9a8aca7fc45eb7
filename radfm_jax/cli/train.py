"""`radfm-jax train`: train or fine-tune from a config (library: `radfm_jax.train.loop.train`)."""

from __future__ import annotations

import json
import os
import sys

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax train --config configs/radfm.py:model=small,mesh=cpu --workdir runs/small \\
    --config.train.steps=2000 --config.data.store=store/ --config.data.tokenizer=tokenizer.model
radfm-jax train --config radfm:model=tiny --workdir /tmp/smoke --config.data.store=synthetic \\
    --config.train.steps=20           # random batches: a smoke test / throughput run
# the metrics in TensorBoard (pip install "radfm-jax[tensorboard]"):
tensorboard --logdir runs/small/tensorboard"""

DESCRIPTION = (
    'Trains (or resumes from the latest checkpoint in --workdir) until train.steps. Data: '
    'data.store names the VolumeStore written by `radfm-jax ingest` (with data.tokenizer), or is '
    '"synthetic" for random batches; it has no default. Writes in --workdir: checkpoints/ (with '
    'config.json: the run\'s config, absolute paths), tokenizer.model (a copy, so `generate` / '
    '`eval --checkpoint WORKDIR` work from anywhere), metrics.jsonl, tensorboard/ (view with '
    '`tensorboard --logdir WORKDIR/tensorboard` after `pip install "radfm-jax[tensorboard]"`) '
    'and loss_curve.png; prints a start-up summary, a line per compiled batch shape and a '
    'progress bar on stderr and one JSON summary line on stdout. Resuming needs the same config '
    'except train.steps, logging / eval / checkpoint cadence, data paths, the mesh and the '
    'generate section. One run per workdir: a second `train` in it fails at once (the lock '
    'checkpoints/.lock). A kill never leaves a step half-written: the rerun resumes from the last '
    'complete one. Compiled programs are kept in a persistent cache '
    '($RADFM_COMPILATION_CACHE: a folder, or "off"; default $XDG_CACHE_HOME/radfm-jax/jax or '
    '~/.cache/radfm-jax/jax), so a rerun or a resume compiles nothing twice. Exit codes: 0 done '
    'or preempted (SIGTERM: checkpoint saved, status "preempted"); 130 Ctrl-C (checkpoint saved, '
    'status "interrupted"; a second Ctrl-C stops without saving); 2 a bad flag or config value, '
    'another run in the workdir, or a write the disk refused (full, read-only: the steps saved '
    'before stay complete); '
    '3 a non-finite loss (the last good checkpoint stays intact).')


def add_parser(sub):
  p = flags.add_command(
      sub, 'train', help='train or fine-tune from a config',
      description=DESCRIPTION, example=EXAMPLE)
  p.add_argument('--workdir', required=True, help='checkpoints, metrics and config go here')
  p.add_argument('--max-steps', type=flags.non_negative_int, default=None,
                 help='stop after this many optimizer steps in total (default: train.steps)')
  p.add_argument('--no-progress', action='store_true',
                 help='no progress bar (it is shown only when stderr is a terminal)')
  p.add_argument('--no-fallback', action='store_true',
                 help='if the latest checkpoint does not restore, stop with its file and reason '
                 '(exit 2) instead of resuming from the newest intact one')
  flags.add_config_arguments(p, required=True, help='experiment config, e.g. '
                             'configs/radfm.py:model=<size>,mesh=<preset>')
  return p


# What a run writes in its workdir, and whether it is a folder: one of the other kind (a folder
# named metrics.jsonl, a file named checkpoints) failed at its first write with a traceback,
# loss_curve.png only after the last step.
_RUN_ENTRIES = (('checkpoints', True), ('tensorboard', True), ('metrics.jsonl', False),
                ('loss_curve.png', False), ('tokenizer.model', False))


def _check_workdir(workdir: str):
  """A new folder or a run's own; a file there (or above it) would fail only at the first write,
  with a traceback, after the model is built."""
  from radfm_jax.errors import InputError, check_parent_folder
  if '://' in workdir:                   # a kvstore URL (gs://...): its own errors
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise InputError(f'--workdir {workdir}: exists and is not a folder; expected the run\'s '
                     'folder (new, or one to resume)')
  check_parent_folder(workdir, f'--workdir {workdir}', 'expected the run\'s folder (new, or one '
                      'to resume)')
  for name, folder in _RUN_ENTRIES:
    path = os.path.join(workdir, name)
    if os.path.exists(path) and os.path.isdir(path) != folder:
      raise InputError(f'--workdir {workdir}: {path} is a {"file" if folder else "folder"}; '
                       f'expected the run\'s {name} {"folder" if folder else "file"} there (or '
                       'nothing: a new run makes it)')
  record = os.path.join(workdir, 'config.json')
  if os.path.isdir(os.path.join(workdir, 'params')) and os.path.isfile(record):
    # a run there would start from random weights, and `load` would still read the old params
    raise InputError(f'--workdir {workdir}: holds a parameter-only checkpoint ({record}); expected '
                     'a new folder or a run to resume (to start from those weights: '
                     f'--config.finetune.init_from={workdir})')


def run(args) -> int:
  from radfm_jax.config import SYNTHETIC_STORE, check_batch_axes, check_data_store, load_config
  cfg = load_config(args.config, args.overrides)     # a bad value fails before JAX starts
  check_data_store(cfg)
  _check_workdir(args.workdir)
  flags.restart_with_allocator(args, cfg.mesh.host_allocator)   # before JAX starts
  from radfm_jax import launch
  from radfm_jax.train import compile_cache
  launch.initialize()
  compile_cache.enable()                              # before the first compile
  import jax
  if cfg.data.store == SYNTHETIC_STORE:
    # Before the heavy imports; a store's batch kinds are checked when its manifest is read
    # (train.loop.open_data), still before the model is built.
    check_batch_axes(cfg, jax.device_count(), jax.process_count(), ('2d',))

  from radfm_jax.train.loop import NonFiniteLossError, train
  try:
    result = train(cfg, args.workdir, max_steps=args.max_steps, progress=not args.no_progress,
                   fallback=not args.no_fallback)
  except NonFiniteLossError as e:
    print(f'radfm-jax train: {e}', file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    last = result.losses[max(result.losses)] if result.losses else None   # (JSON has no NaN)
    print(json.dumps({'status': result.status, 'step': result.step, 'last_loss': last,
                      'checkpoint': result.last_checkpoint,
                      'compilation_cache': compile_cache.counts()}), flush=True)
  return 130 if result.status == 'interrupted' else 0
