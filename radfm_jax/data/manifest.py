"""Reading a sample manifest: a JSONL file, or a TFDS dataset directory from `radfm-jax publish`.

    records = read_manifest('STORE/manifest.jsonl', split='train')
    records = read_manifest('DIR/radfm_samples/1.0.0')             # every split, in order

This is the one place that knows both formats, so the volume store (store.py) stays a plain
TensorStore + JSONL module and the TFDS module (tfds_manifest.py) can read rows through the store
without an import cycle.
"""

from __future__ import annotations

import os

from radfm_jax.data.store import read_jsonl


def read_manifest(path: str, split: str | None = None) -> list[dict]:
  """The sample rows of a manifest JSONL file or of a TFDS dataset directory written by
  `radfm-jax publish` (tfds_manifest.py); with `split`, only that split's rows (a row without a
  `split` field is 'train')."""
  if os.path.isdir(path):
    from radfm_jax.data.tfds_manifest import read_tfds_manifest
    return read_tfds_manifest(path, split)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'manifest {path}: no such file (expected a JSONL file or a TFDS '
                            'dataset directory)')
  rows = read_jsonl(path)
  return rows if split is None else [r for r in rows if r.get('split', 'train') == split]
