"""`radfm-jax aot`: compile the train step ahead of time for a TPU topology, from a CPU host
(library: `radfm_jax.train.aot.fit_check`)."""

from __future__ import annotations

import json
import sys

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax aot --config configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_8 --batch-2d 4 \\
    --config.model.remat_policy=full --json fit.jsonl"""


def add_parser(sub):
  p = flags.add_command(
      sub, 'aot', help='compile the train step ahead of time for a TPU topology',
      description="Lowers and compiles the jitted train step for the mesh preset's TPU topology "
      'on this host (needs libtpu, no TPU) and reports per-chip memory and FLOPs. Exit code 0 '
      'when every batch kind fits in mesh.hbm_gib, 1 when one does not, 2 for a preset without '
      'a TPU topology.', example=EXAMPLE)
  p.add_argument('--batch-2d', type=int, default=None,
                 help='global 2D batch (samples; default one per chip)')
  p.add_argument('--batch-3d', type=int, default=None,
                 help='global 3D batch (samples; default one per chip)')
  p.add_argument('--images-2d', type=int, default=4, help='images per 2D sample')
  p.add_argument('--text-len', type=int, default=None,
                 help='text length (default: max data.text_lengths)')
  p.add_argument('--kinds', default=None,
                 help="comma list of '2d','3d' (default: those given by --batch-*, else both)")
  p.add_argument('--json', default=None, help='append the reports as JSON lines here')
  flags.add_config_arguments(p, required=True,
                             help='experiment config with a tpu_* mesh preset, e.g. '
                                  'configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_128')
  return p


def run(args) -> int:
  from radfm_jax.config import load_config
  cfg = load_config(args.config, args.overrides)
  if not cfg.mesh.topology:
    print(f'radfm-jax aot: mesh preset {cfg.mesh.preset!r} names no TPU topology; use a tpu_* '
          'preset', file=sys.stderr)
    return 2
  from radfm_jax.train import aot
  aot.set_tpu_env(cfg.mesh.topology)      # before JAX is imported
  if args.kinds:
    kinds = args.kinds.split(',')
  else:
    kinds = [k for k, b in (('2d', args.batch_2d), ('3d', args.batch_3d)) if b] or ['2d', '3d']
  all_fit = True
  for kind in kinds:
    batch = args.batch_2d if kind == '2d' else args.batch_3d
    report = aot.fit_check(cfg, kind, batch, images_2d=args.images_2d, text_len=args.text_len)
    print(aot.format_report(report), flush=True)
    all_fit &= report['fits']
    if args.json:
      with open(args.json, 'a') as f:
        f.write(json.dumps(report) + '\n')
  return 0 if all_fit else 1
