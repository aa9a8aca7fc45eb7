"""`radfm-jax merge`: fold a LoRA / QLoRA run's adapters into its base weights and write a plain
parameter checkpoint (library: `radfm_jax.checkpoint.load`, which merges through
`radfm_jax.models.lora.merge`, and `radfm_jax.checkpoint.save`)."""

from __future__ import annotations

import sys
import time

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax merge --checkpoint runs/lora --out merged/
radfm-jax convert to-torch --checkpoint merged/ --out model.safetensors"""


def add_parser(sub):
  p = flags.add_command(
      sub, 'merge', help="fold a LoRA / QLoRA run's adapters into the base weights",
      description='Reads a LoRA or QLoRA training run (its latest step, or --step), computes '
      'W + A B alpha / rank for every adapted kernel (QLoRA: from the dequantized base) and '
      'writes a plain parameter-only checkpoint that generate, eval, `convert to-torch` and '
      'further training (finetune.init_from) read like any converted model.', example=EXAMPLE)
  p.add_argument('--checkpoint', required=True, help='a LoRA / QLoRA training workdir or step')
  p.add_argument('--step', type=int, default=None, help='training step (default: the latest)')
  p.add_argument('--out', required=True, help='output checkpoint directory (new, or with '
                 '--overwrite a parameter-only checkpoint to replace)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --out checkpoint')
  return p


def run(args) -> int:
  import os

  from radfm_jax import checkpoint
  from radfm_jax.checkpoint import meta
  from radfm_jax.checkpoint.read import finetune_of
  from radfm_jax.errors import InputError, reading
  if not os.path.exists(args.checkpoint):
    raise InputError(f'--checkpoint {args.checkpoint}: no such checkpoint directory')
  meta.checked_record(args.checkpoint)       # a checkpoint at all, before its finetune section
  flags.check_output_folder(args.out, args.overwrite)
  method = finetune_of(args.checkpoint).method
  if method == 'full':
    raise InputError(f'{args.checkpoint}: finetune.method is full (no adapters to merge); '
                     'expected a LoRA / QLoRA training run')
  start = time.time()
  with reading(f'--checkpoint {args.checkpoint}'):     # no such step, missing files
    model, _ = checkpoint.load(args.checkpoint, step=args.step)
  checkpoint.save(model, args.out, merged_from=os.path.abspath(args.checkpoint),
                  finetune=method)
  print(f'wrote {args.out} ({method} adapters folded in) in {time.time() - start:.1f}s',
        file=sys.stdout)
  return 0
