"""`radfm-jax aot`: compile the train step (or, with --generate, prefill + decode) ahead of time
for a TPU topology, from a CPU host (library: `radfm_jax.train.aot.fit_check`,
`radfm_jax.infer.aot.generate_fit_check`)."""

from __future__ import annotations

import json
import os
import sys

from radfm_jax.cli import flags
from radfm_jax.infer import QUANTIZE_MODES

EXAMPLE = """\
radfm-jax aot --config configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_8 --batch-2d 4 \\
    --config.model.remat_policy=full --json fit.jsonl
radfm-jax aot --generate --quantize int8 --config configs/radfm.py:model=radfm_13b,mesh=tpu_v5e_1 \\
    --config.model.param_dtype=bfloat16 --json benchmarks/generate_fit_13b.jsonl"""


CONTEXT, MAX_NEW = 2048, 256     # --generate's defaults


def add_parser(sub):
  p = flags.add_command(
      sub, 'aot', help='compile the train step ahead of time for a TPU topology',
      description="Lowers and compiles the jitted train step for the mesh preset's TPU topology "
      'on this host (needs libtpu, no TPU) and reports per-chip memory and FLOPs. Exit code 0 '
      'when every batch kind fits in mesh.hbm_gib, 1 when one does not, 2 for a preset without '
      'a TPU topology, a mesh.topology libtpu rejects, or no libtpu (the tpu extra). '
      '--generate compiles what `radfm-jax generate` runs (prefill + KV-cache '
      'decode, --context tokens in all) instead, --quantize int8 with Qwix int8 weights.',
      example=EXAMPLE)
  p.add_argument('--batch-2d', type=flags.positive_int, default=None,
                 help='global 2D batch (samples; default one per chip)')
  p.add_argument('--batch-3d', type=flags.positive_int, default=None,
                 help='global 3D batch (samples; default one per chip)')
  p.add_argument('--images-2d', type=flags.positive_int, default=4, help='images per 2D sample')
  p.add_argument('--text-len', type=flags.positive_int, default=None,
                 help='text length (default: max data.text_lengths)')
  p.add_argument('--kinds', default=None,
                 help="comma list of '2d','3d' (default: those given by --batch-*, else both)")
  p.add_argument('--json', default=None, help='append the reports as JSON lines here')
  p.add_argument('--generate', action='store_true',
                 help='compile prefill + decode (radfm-jax generate) instead of the train step '
                      '(radfm_jax.infer.aot); batch from --batch-2d / --batch-3d (default 1)')
  p.add_argument('--quantize', choices=QUANTIZE_MODES, default=None,
                 help='with --generate: Qwix int8 weights, w8a8 also int8 activations (as '
                      'generate --quantize)')
  p.add_argument('--context', type=flags.positive_int, default=None,
                 help=f'with --generate: prompt + new tokens (default: {CONTEXT})')
  p.add_argument('--max-new', type=flags.positive_int, default=None,
                 help=f'with --generate: new tokens (default: {MAX_NEW})')
  flags.add_config_arguments(p, required=True,
                             help='experiment config with a tpu_* mesh preset, e.g. '
                                  'configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_128')
  return p


def _checked(args, cfg):
  """The flags against each other and the model, before anything compiles (a kind outside 2d /
  3d compiled as 3D; a context past the model's positions compiled and reported as fitting)."""
  from radfm_jax.errors import InputError
  kinds = args.kinds.split(',') if args.kinds else []
  if any(k not in ('2d', '3d') for k in kinds) or len(set(kinds)) != len(kinds) or (
      args.generate and len(kinds) > 1):
    expected = '2d or 3d' if args.generate else 'a comma list of 2d, 3d, each once'
    raise InputError(f'--kinds {args.kinds}: expected {expected}')
  limit = cfg.model.llama.max_position_embeddings
  # a flag of the other mode would be accepted and do nothing
  other = ([('--text-len', args.text_len)] if args.generate else
           [('--context', args.context), ('--max-new', args.max_new)])
  for flag, value in other:
    if value is not None:
      raise InputError(f'{flag} {value}: ' + (
          "the train step's text length, not compiled with --generate; expected --context "
          '(prompt + new tokens) and --max-new' if args.generate else
          "goes with --generate; expected --text-len for the train step's text length"))
  if args.text_len is not None and args.text_len > limit:
    raise InputError(f'--text-len {args.text_len}: expected a text length <= the model\'s {limit} '
                     'positions (model.llama.max_position_embeddings)')
  if args.generate:
    args.context = CONTEXT if args.context is None else args.context
    args.max_new = MAX_NEW if args.max_new is None else args.max_new
    if args.max_new >= args.context or args.context > limit:
      raise InputError(f'--context {args.context} --max-new {args.max_new}: expected max-new < '
                       f'context <= the model\'s {limit} positions '
                       '(model.llama.max_position_embeddings)')
  if args.json and os.path.isdir(args.json):
    raise InputError(f'--json {args.json}: a folder; expected a file to append the reports to')
  return kinds


def run(args) -> int:
  from radfm_jax.config import load_config
  cfg = load_config(args.config, args.overrides)
  _checked(args, cfg)
  if not cfg.mesh.topology:
    print(f'radfm-jax aot: mesh preset {cfg.mesh.preset!r} names no TPU topology; use a tpu_* '
          'preset', file=sys.stderr)
    return 2
  from radfm_jax.train import aot
  aot.set_tpu_env(cfg.mesh.topology)      # before JAX is imported
  if args.generate:
    return _generate(cfg, args)
  if args.quantize:
    print('radfm-jax aot: --quantize needs --generate', file=sys.stderr)
    return 2
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


def _generate(cfg, args) -> int:
  from radfm_jax.infer.aot import format_generate_report, generate_fit_check
  kind = args.kinds or ('3d' if args.batch_3d and not args.batch_2d else '2d')
  batch = (args.batch_3d if kind == '3d' else args.batch_2d) or 1
  report = generate_fit_check(cfg, quantize=args.quantize, batch=batch, kind=kind,
                              images_2d=args.images_2d, context=args.context,
                              max_new=args.max_new)
  print(format_generate_report(report), flush=True)
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps(report) + '\n')
  return 0 if report['fits'] else 1
