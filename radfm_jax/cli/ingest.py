"""`radfm-jax ingest`: read scans into a VolumeStore (library: `radfm_jax.data.ingest.ingest`)."""

from __future__ import annotations

import sys

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax ingest --manifest samples.jsonl --out store/ --workers 8
# a line of samples.jsonl:
# {"id": "s1", "question": "Is there a lesion?", "answer": "Yes.",
#  "images": [{"path": "scans/ct1.nii.gz", "modality": "CT", "position": {"question": 0}}]}"""


def add_parser(sub):
  from radfm_jax.data.manifest import schema_help
  p = flags.add_command(
      sub, 'ingest', help='read scans (NIfTI, DICOM, PNG/JPEG, .npy) into a VolumeStore',
      description='Reads every scan of a samples manifest (NIfTI, DICOM series, PNG/JPEG, .npy) '
      'into a VolumeStore (Zarr volumes + manifest.jsonl); unreadable inputs go to rejects.jsonl. '
      'Every manifest line is checked first (a bad one: exit code 2, naming file, line and '
      'field). Exit code 1 with --strict when anything was rejected.', example=EXAMPLE)
  p.epilog += '\n\n' + schema_help()
  p.add_argument('--manifest', required=True, help='input samples JSONL (fields below)')
  p.add_argument('--out', required=True, help='store directory to create or extend')
  p.add_argument('--strict', action='store_true', help='exit non-zero if anything is rejected')
  p.add_argument('--root', default=None, help='base folder for relative image paths '
                 '(default: the manifest folder)')
  p.add_argument('--batch-size', type=int, default=16, help='scans per write transaction')
  p.add_argument('--workers', type=int, default=None, help='reader threads (default: automatic)')
  return p


def run(args) -> int:
  from radfm_jax.data.ingest import IngestError, ingest
  try:
    ingest(args.manifest, args.out, strict=args.strict, root=args.root,
           batch_size=args.batch_size, workers=args.workers)
  except IngestError as e:
    print(f'radfm-jax ingest: {e}', file=sys.stderr)
    return 1
  return 0
