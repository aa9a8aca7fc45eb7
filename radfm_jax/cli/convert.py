"""`radfm-jax convert {from-torch, to-torch, from-hf-llama}` (library: `radfm_jax.convert.api`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax convert from-torch --checkpoint pytorch_model.bin --out ckpt/ --dtype bfloat16
radfm-jax convert from-torch --checkpoint pytorch_model.bin --out ckpt/ \\
    --config configs/radfm.py:model=radfm_13b --config.model.llama.rope_theta=10000.0
radfm-jax convert to-torch --checkpoint ckpt/ --out model.safetensors
radfm-jax convert from-hf-llama --hf llama-13b-hf/ --config configs/radfm.py:model=radfm_13b \\
    --out ckpt/"""


def _direction(sub, name: str, help: str, example: str):
  p = sub.add_parser(name, help=help, description=f'radfm-jax convert {name}: {help}.',
                     formatter_class=flags.Formatter,
                     epilog='example:\n  ' + example)
  p.set_defaults(_parser=p, _takes_config=False)
  return p


def _common(p, config_help: str):
  p.add_argument('--out', required=True, help='output checkpoint directory (new, or with '
                 '--overwrite a parameter-only checkpoint to replace)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --out checkpoint')
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'),
                 help='parameter dtype of the output (default: the config param_dtype)')
  p.add_argument('--llama-heads', type=flags.positive_int, default=None,
                 help='LLaMA head count (not recoverable from tensor shapes)')
  p.add_argument('--cast', action='store_true',
                 help='also accept tensors that are not float16/bfloat16/float32/float64 (int, '
                 'bool, complex), cast to the parameter dtype; every value is checked either way '
                 '(beyond the dtype range or an imaginary part is an error naming the key)')
  flags.add_config_arguments(p, required=False, help=config_help, sections=('model',),
                             note='Only the model section is used.')


def add_parser(sub):
  p = flags.add_command(
      sub, 'convert', help='convert checkpoints: official PyTorch <-> Orbax, HF LLaMA',
      description='Converts the official RadFM PyTorch checkpoint to an Orbax checkpoint and '
      'back, or starts a model from HF LLaMA safetensors. See `radfm-jax convert DIRECTION '
      '--help`.', example=EXAMPLE)
  directions = p.add_subparsers(dest='direction', required=True, metavar='DIRECTION')

  d = _direction(directions, 'from-torch', 'official RadFM checkpoint -> Orbax',
                 'radfm-jax convert from-torch --checkpoint pytorch_model.bin --out ckpt/')
  d.add_argument('--checkpoint', required=True, help='pytorch_model.bin or model.safetensors')
  _common(d, 'optional config (configs/radfm.py:model=...); sizes are otherwise inferred from '
             'the checkpoint, and a given config must agree with them')

  d = _direction(directions, 'to-torch', 'Orbax checkpoint -> official state dict',
                 'radfm-jax convert to-torch --checkpoint ckpt/ --out model.safetensors')
  d.add_argument('--checkpoint', required=True, help='converted or trained checkpoint directory')
  d.add_argument('--out', required=True,
                 help='.bin (torch.save) or .safetensors file (its folder is created)')
  d.add_argument('--overwrite', action='store_true', help='replace an existing --out file')
  d.add_argument('--no-alias', action='store_true',
                 help='omit embedding_layer.weight (a duplicate of the LLaMA input embedding)')

  d = _direction(directions, 'from-hf-llama', 'HF LLaMA safetensors as the decoder of a new model',
                 'radfm-jax convert from-hf-llama --hf llama-13b-hf/ '
                 '--config configs/radfm.py:model=radfm_13b --out ckpt/')
  d.add_argument('--hf', required=True, help='folder of HF safetensors shards (+ config.json)')
  d.add_argument('--seed', type=flags.seed, default=0, help='seed of the fresh vision towers')
  _common(d, 'config for the vision towers (configs/radfm.py:model=...)')
  return p


def _model_config(args):
  if args.config is None:
    if args.overrides:
      args._parser.error(f'--config.{args.overrides[0]} needs --config FILE:ARG')
    return None
  from radfm_jax.config import check_override_sections, load_config
  check_override_sections(args.overrides, ('model',), 'the other sections are not read by '
                          'convert')
  return load_config(args.config, args.overrides).model


def _inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies under it (symlinks resolved)."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def run(args: argparse.Namespace) -> int:
  from radfm_jax.checkpoint import tree
  from radfm_jax.convert import api
  from radfm_jax.errors import InputError, reading
  flag, source = (('--hf', args.hf) if args.direction == 'from-hf-llama'
                  else ('--checkpoint', args.checkpoint))
  if not os.path.exists(source):
    raise InputError(f'{flag} {source}: no such file or directory')
  if args.direction == 'to-torch':
    flags.check_output_file(args.out, args.overwrite)
  else:
    flags.check_output_folder(args.out, args.overwrite)
    if _inside(source, args.out):  # --overwrite replaces --out whole: the input with it
      raise InputError(f'{flag} {source}: inside --out {args.out}, which convert replaces; '
                       'expected --out another folder')
  tree.limit_malloc_arenas()   # before TensorStore starts its threads
  start = time.time()
  if args.direction == 'from-torch':
    cfg = api.from_torch(args.checkpoint, args.out, _model_config(args), dtype=args.dtype,
                         llama_heads=args.llama_heads, cast=args.cast)
  elif args.direction == 'from-hf-llama':
    cfg = api.from_hf_llama(args.hf, args.out, _model_config(args), dtype=args.dtype,
                            llama_heads=args.llama_heads, seed=args.seed, cast=args.cast)
  else:
    from radfm_jax.checkpoint import meta
    meta.checked_record(args.checkpoint)     # a checkpoint at all (a .bin here: the wrong way)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with reading(f'--checkpoint {args.checkpoint}'):    # no params/ folder, an unknown layout
      keys = api.to_torch(args.checkpoint, args.out, include_alias=not args.no_alias)
    print(f'wrote {len(keys)} tensors to {args.out} in {time.time() - start:.1f}s')
    return 0
  l, v = cfg.llama, cfg.vision
  print(f'wrote {args.out} in {time.time() - start:.1f}s: llama {l.num_layers}x{l.hidden_size} '
        f'({l.num_heads} heads, vocab {l.vocab_size}), vision {v.depth}x{v.dim}, '
        f'param_dtype {cfg.param_dtype}', file=sys.stdout)
  return 0
