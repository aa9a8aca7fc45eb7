"""`radfm-jax convert {from-torch, to-torch, from-hf-llama}`: a thin layer over `convert.api`.

    radfm-jax convert from-torch --checkpoint pytorch_model.bin --out ckpt/ [--dtype bfloat16]
        [--config configs/radfm.py:model=radfm_13b] [--set model.llama.rope_theta=10000.0] [--llama-heads 40]
    radfm-jax convert to-torch --checkpoint ckpt/ --out model.safetensors|pytorch_model.bin
    radfm-jax convert from-hf-llama --hf llama-13b-hf/ --config configs/radfm.py:model=radfm_13b --out ckpt/
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser):
  sub = parser.add_subparsers(dest='direction', required=True)

  def common(p, config_help):
    p.add_argument('--out', required=True, help='output checkpoint directory')
    p.add_argument('--config', default=None, help=config_help)
    p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                   help='config override, e.g. model.llama.rope_theta=10000.0 (repeatable)')
    p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'),
                   help='parameter dtype of the output (default: the config param_dtype)')
    p.add_argument('--llama-heads', type=int, default=None,
                   help='LLaMA head count (not recoverable from tensor shapes)')

  p = sub.add_parser('from-torch', help='official RadFM checkpoint -> Orbax')
  p.add_argument('--checkpoint', required=True, help='pytorch_model.bin or model.safetensors')
  common(p, 'optional config spec (configs/radfm.py:model=...); sizes are otherwise inferred '
            'from the checkpoint, and a given config must agree with them')

  p = sub.add_parser('to-torch', help='Orbax checkpoint -> official state dict')
  p.add_argument('--checkpoint', required=True, help='converted or trained checkpoint directory')
  p.add_argument('--out', required=True, help='.bin (torch.save) or .safetensors file')
  p.add_argument('--no-alias', action='store_true',
                 help='omit embedding_layer.weight (a duplicate of the LLaMA input embedding)')

  p = sub.add_parser('from-hf-llama', help='HF LLaMA safetensors as the decoder of a new model')
  p.add_argument('--hf', required=True, help='folder of HF safetensors shards (+ config.json)')
  p.add_argument('--seed', type=int, default=0, help='seed of the fresh vision towers')
  common(p, 'config spec for the vision towers (configs/radfm.py:model=...)')


def _model_config(args):
  if args.config is None:
    if args.set:
      raise SystemExit('--set needs --config')
    return None
  from radfm_jax.config import load_config
  return load_config(args.config, overrides=args.set).model


def run(args) -> int:
  from radfm_jax.convert import api, engine
  engine.limit_malloc_arenas()   # before TensorStore starts its threads
  start = time.time()
  if args.direction == 'from-torch':
    cfg = api.from_torch(args.checkpoint, args.out, _model_config(args), dtype=args.dtype,
                         llama_heads=args.llama_heads)
  elif args.direction == 'from-hf-llama':
    cfg = api.from_hf_llama(args.hf, args.out, _model_config(args), dtype=args.dtype,
                            llama_heads=args.llama_heads, seed=args.seed)
  else:
    keys = api.to_torch(args.checkpoint, args.out, include_alias=not args.no_alias)
    print(f'wrote {len(keys)} tensors to {args.out} in {time.time() - start:.1f}s')
    return 0
  l, v = cfg.llama, cfg.vision
  print(f'wrote {args.out} in {time.time() - start:.1f}s: llama {l.num_layers}x{l.hidden_size} '
        f'({l.num_heads} heads, vocab {l.vocab_size}), vision {v.depth}x{v.dim}, '
        f'param_dtype {cfg.param_dtype}')
  return 0
