"""`radfm-jax ingest`: read scans into a VolumeStore (library: `radfm_jax.data.ingest.ingest`)."""

from __future__ import annotations

import argparse
import math
import re
import sys

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax ingest --manifest samples.jsonl --out store/ --workers 8
# a line of samples.jsonl:
# {"id": "s1", "question": "Is there a lesion?", "answer": "Yes.",
#  "images": [{"path": "scans/ct1.nii.gz", "modality": "CT", "position": {"question": 0}}]}
radfm-jax ingest --manifest more.jsonl --out store/        # extends store/ (same ids: same content)
radfm-jax ingest --recipe vqa_rad --source csv/vqarad_test.csv --image-root images/ --out store/
radfm-jax ingest --recipe radfm --source csv/ --image-root images/ --out store/   # every file
radfm-jax ingest --runner beam --manifest samples.jsonl --out store/ -- \
    --direct_running_mode=multi_processing --direct_num_workers=4   # Beam options after --"""

_UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}


def byte_size(text: str) -> int:
  """'2G', '512M', '1.5G', '4096' -> bytes (binary units; a trailing 'B'/'iB' is allowed)."""
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*', text, re.IGNORECASE)
  value = float(m.group(1)) * _UNITS[m.group(2).upper()] if m else 0.0
  if value < 1 or value != int(value):     # '0.5' or '1.5' bytes: not a whole number of bytes
    raise argparse.ArgumentTypeError(f'{text!r}: expected a positive size such as 2G, 512M or '
                                     '1048576 (whole bytes)')
  return int(value)


def seconds(text: str) -> float:
  """'30', '0.5' -> seconds; a negative, infinite or NaN value is a usage error."""
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not (math.isfinite(value) and value >= 0):
    raise argparse.ArgumentTypeError(f'{text!r}: expected a number of seconds >= 0')
  return value


def add_parser(sub):
  from radfm_jax.data.manifest import schema_help
  p = flags.add_command(
      sub, 'ingest', help='read scans (NIfTI, DICOM, PNG/JPEG, .npy) into a VolumeStore',
      description='Reads every scan of a samples manifest (NIfTI, DICOM series, PNG/JPEG, .npy) '
      'into a VolumeStore (Zarr volumes + manifest.jsonl); unreadable inputs go to rejects.jsonl, '
      'recorded repairs and warnings (spacing, header fields, MONOCHROME1, float64 rounding) to '
      'warnings.jsonl. The store is extended, never replaced: the '
      'samples are merged into its manifest, scans whose files are unchanged (sha256) are '
      'skipped, changed files are read again (so are unchanged ones whose stored arrays can no '
      'longer be opened: the re-run repairs a damaged store). One ingest writes a store at a time '
      '(a second one waits for the lock). A missing manifest, duplicate sample ids, a scan id '
      'naming two files or a sample id the store holds with other content stop before anything '
      'is written (exit 2). Exit code 1 when no sample of the input was kept, and with --strict '
      'when anything was rejected.',
      example=EXAMPLE)
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument('--manifest', help='input samples JSONL (fields below)')
  what.add_argument('--recipe', metavar='NAME',
                    help='an original RadFM split file instead of a manifest: a recipe name of '
                    '`radfm-jax recipes list`, or radfm for every recipe (with --source FOLDER)')
  p.add_argument('--source', metavar='FILE|FOLDER', default=None,
                 help='--recipe: the split file (CSV / JSON), or with --recipe radfm the folder '
                 'holding them under their original names (searched recursively)')
  p.add_argument('--image-root', metavar='[NAME=]DIR', action='append', default=None,
                 help='--recipe: where the paths the split files name start (an absolute path is '
                 'used as is); NAME=DIR for recipe NAME only (repeatable, e.g. '
                 'medpix_single=MedPix/images); default: the folder of --source')
  p.add_argument('--split', choices=('train', 'test'), default=None,
                 help='--recipe: the split to tag the records with (default: from the file name: '
                 'the original\'s train or test file; required for another name)')
  p.add_argument('--seed', type=flags.seed, default=None,      # None: not given (0 for --recipe)
                 help='--recipe: seed of the prompt and placement choices (row n of recipe R uses '
                 'random.Random("SEED/R/SPLIT/n"); default 0)')
  p.epilog += '\n\n' + schema_help()
  p.add_argument('--out', required=True, help='store directory to create or extend')
  p.add_argument('--strict', action='store_true',
                 help='exit non-zero if anything is rejected (without it: only when nothing was '
                 'kept)')
  p.add_argument('--replace', action='store_true',
                 help='a sample id (or scan id) the store holds with other content is replaced '
                 'instead of being an error')
  p.add_argument('--root', default=None, help='base folder for relative image paths '
                 '(default: the manifest folder)')
  p.add_argument('--batch-size', type=flags.positive_int, default=16,
                 help='scans per write transaction')
  p.add_argument('--workers', type=flags.positive_int, default=None,
                 help='reader threads (default: automatic)')
  p.add_argument('--max-scan-bytes', type=byte_size, default='2G', metavar='SIZE',
                 help='largest decoded scan (e.g. 512M, 4G); checked from the header before '
                 'anything is allocated, and a compressed file cannot claim more than DEFLATE '
                 'can expand (default: 2G)')
  p.add_argument('--lock-timeout', type=seconds, default=None, metavar='SECONDS',
                 help='give up after waiting this long for another ingest into the same store '
                 '(default: wait until it ends)')
  p.add_argument('--train-resolution', type=int, default=None, metavar='N',   # checked by ingest
                 help='also keep every 3D scan larger than N x N in-plane as a copy resized to '
                 'N x N (nearest, full depth, stored dtype) that training reads instead when its '
                 '3D batches are N x N (data.image_size_3d_single, 256 in RadFM): the same model '
                 'inputs from ~(H*W)/(N*N) fewer voxels; the full scan stays the source '
                 '(docs/data.md "Training-resolution copies")')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  p.add_argument('--runner', choices=('local', 'beam'), default='local',
                 help='local: this process (reader threads); beam: an Apache Beam pipeline that '
                 'writes the scans into shards of the store, one worker per shard, Beam options '
                 'after -- (DirectRunner by default; docs/data.md "Ingest at scale")')
  p.add_argument('beam_args', nargs='*', metavar='-- BEAM_OPTION',
                 help='Beam pipeline options for --runner beam (e.g. --runner=DataflowRunner '
                 '--project=P --region=R --temp_location=gs://B/tmp)')
  return p


def run(args) -> int:
  import os
  from radfm_jax.data.ingest import IngestError, ingest
  if args.beam_args and args.runner != 'beam':
    args._parser.error(f'Beam options ({" ".join(args.beam_args)}) need --runner beam')
  store_scans = None                 # local: ingest's own writer
  if args.runner == 'beam':
    from radfm_jax.data.beam_ingest import beam_store_scans
    store_scans = beam_store_scans(args.beam_args)
  options = dict(strict=args.strict, batch_size=args.batch_size, workers=args.workers,
                 replace=args.replace, max_scan_bytes=args.max_scan_bytes,
                 progress=not args.no_progress, lock_timeout=args.lock_timeout, store_scans=store_scans,
                 train_resolution=args.train_resolution)
  # A recipe flag given with --manifest would be silently unused (--seed too: a manifest's
  # prompts are drawn by training, not by ingest).
  recipe_flags = [f for f in ('source', 'image_root', 'split', 'seed')
                  if getattr(args, f) is not None]
  if args.manifest and recipe_flags:
    args._parser.error(f'--{recipe_flags[0].replace("_", "-")} goes with --recipe, not --manifest')
  if args.recipe and (args.source is None or args.root is not None):
    args._parser.error('--recipe needs --source FILE (or FOLDER with --recipe radfm) and takes '
                       '--image-root, not --root')
  try:
    if args.recipe:
      from radfm_jax.data.recipes import ingest_recipe
      from radfm_jax.data.recipes import RECIPES
      source = args.source
      roots = {'': (source if os.path.isdir(source) else os.path.dirname(source)) or '.'}
      given: dict[str, str] = {}
      for value in args.image_root or ():
        name, eq, folder = value.partition('=')
        if eq and name.isidentifier() and name not in RECIPES:
          args._parser.error(f'--image-root {value}: {name} is no recipe; expected NAME=DIR with '
                             'NAME from `radfm-jax recipes list`, or DIR')
        if eq and name in RECIPES and args.recipe in RECIPES and args.recipe != name:
          # it would be silently unused: the one recipe's scans are under the default root
          args._parser.error(f'--image-root {value}: names recipe {name}, not the one ingested '
                             f'(--recipe {args.recipe}); expected DIR, or {args.recipe}=DIR')
        key = name if eq and name in RECIPES else ''
        if key in given:          # the later one would silently win: one root is searched
          args._parser.error(f'--image-root {value}: a second root for '
                             f'{"recipe " + key if key else "every recipe"} (after --image-root '
                             f'{given[key]}); expected one DIR per recipe (a recipe reads its '
                             'images from one root)')
        given[key] = value
        roots.update({name: folder} if eq and name in RECIPES else {'': value})
      _, report = ingest_recipe(args.recipe, source, roots, args.out, args.split,
                                0 if args.seed is None else args.seed, **options)
    else:
      report = ingest(args.manifest, args.out, root=args.root, **options)
  except IngestError as e:
    print(f'radfm-jax ingest: {e}', file=sys.stderr)
    return 1
  if report.rejects and not report.samples:
    # Not one sample of the input was kept: an exit code of 0 would let a script go on to train
    # on a store without them.
    print(f'radfm-jax ingest: no sample of the input was kept ({report.rejected_text()}; see '
          f'{os.path.join(args.out, "rejects.jsonl")}); expected at least one readable sample',
          file=sys.stderr)
    return 1
  return 0
