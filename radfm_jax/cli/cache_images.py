"""`radfm-jax cache-images`: write each scan's image tokens into the store once, for runs whose
vision tower is frozen (library: `radfm_jax.train.image_cache.cache_images`)."""

from __future__ import annotations

import json

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax cache-images --checkpoint run --data store/
# the whole flow: a frozen, dropout-free vision tower, 2D images uncropped; step 0 saved; cached;
# then trained on tokens
radfm-jax train --config configs/radfm.py:model=small --config.train.freeze="['vision_tower']" \\
    --config.model.vision.dropout=0.0 --config.data.random_crop_2d=False \\
    --config.data.store=store/ \\
    --config.data.tokenizer=tokenizer.model --workdir run --max-steps 0
radfm-jax cache-images --checkpoint run --data store/
radfm-jax train ... --workdir run --config.data.image_cache=True     # reads tokens, no ViT"""


def add_parser(sub):
  p = flags.add_command(
      sub, 'cache-images', help="cache each scan's image tokens in the store",
      description="Runs the checkpoint's vision tower, Perceiver and fc once over every scan of "
      "the store's manifest (prepared as the training pipeline prepares it) and writes each "
      "scan's image tokens into STORE/image_tokens/, keyed by the vision weights' fingerprint "
      'and the scan id. A run with train.freeze covering the vision tower, '
      'model.vision.dropout=0, data.random_crop_2d=False and data.image_cache=True then reads '
      'tokens instead of volumes. '
      'Prints one JSON line (fingerprint, scans, bytes).', example=EXAMPLE)
  p.add_argument('--checkpoint', required=True,
                 help='training workdir / checkpoint folder (or a parameter-only checkpoint with '
                      '--config for the data settings)')
  p.add_argument('--data', required=True, metavar='STORE', help='the volume store to cache')
  p.add_argument('--step', type=int, default=None, help='training step (default: the latest)')
  p.add_argument('--no-progress', action='store_true', help='no tqdm progress bar')
  flags.add_config_arguments(p, required=False,
                             help="the data and mesh settings of the training run (default: the "
                                  "checkpoint's own data section, one fsdp axis over every device)")
  return p


def run(args) -> int:
  data_cfg = mesh_cfg = None
  from radfm_jax.config import check_override_sections
  check_override_sections(args.overrides, ('data', 'mesh'), 'the model comes from the checkpoint '
                          'and cache-images trains nothing')
  if args.config:
    from radfm_jax.config import load_config
    cfg = load_config(args.config, args.overrides)
    data_cfg, mesh_cfg = cfg.data, cfg.mesh
  import os

  from radfm_jax.checkpoint.meta import checked_record
  from radfm_jax.data.store import is_url
  from radfm_jax.errors import InputError, reading
  checked_record(args.checkpoint)       # a checkpoint at all, first
  if not is_url(args.data) and not os.path.isdir(args.data):   # before the checkpoint is loaded
    what = 'a file' if os.path.exists(args.data) else 'no such folder'
    raise InputError(f'--data {args.data}: {what}; expected the volume store folder `radfm-jax '
                     'ingest` wrote')
  from radfm_jax.train.image_cache import cache_images
  with reading(f'--checkpoint {args.checkpoint}'):    # no such step, missing files
    stats = cache_images(args.checkpoint, args.data, data_cfg=data_cfg, mesh_cfg=mesh_cfg,
                         step=args.step, progress=not args.no_progress)
  print(json.dumps(stats))
  return 0
