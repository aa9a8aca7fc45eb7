"""`radfm-jax publish`: a manifest as a TFDS ArrayRecord dataset
(library: `radfm_jax.data.publish.publish_manifest`)."""

from __future__ import annotations

import sys

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax publish --data store/ --out tfds_data/
# -> tfds_data/radfm_samples/1.0.0, which data.manifest may name"""


def add_parser(sub):
  p = flags.add_command(
      sub, 'publish', help='publish a manifest as a TFDS ArrayRecord dataset',
      description='Writes the manifest of a store (or a manifest JSONL) as a TFDS ArrayRecord '
      'dataset, one split per manifest split (the `tfds` extra; no TensorFlow). Exit code 2 on a '
      'missing input or an existing version without --overwrite.', example=EXAMPLE)
  p.add_argument('--data', required=True,
                 help='a store directory, its manifest.jsonl, or a manifest JSONL')
  p.add_argument('--out', required=True, help='TFDS data dir to write into')
  p.add_argument('--overwrite', action='store_true', help='replace an existing version')
  return p


def run(args) -> int:
  from radfm_jax.data.publish import publish_manifest
  try:
    path = publish_manifest(args.data, args.out, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'radfm-jax publish: {e}', file=sys.stderr)
    return 2
  print(f'published {path}')
  return 0
