"""`radfm-jax publish`: manifest rows, checked as training reads them, written as a TFDS
ArrayRecord dataset (data/tfds_manifest.py: the format and its reader).

    path = publish_manifest('STORE', 'DIR')           # a store, its manifest.jsonl, or any JSONL

Here, not in tfds_manifest.py: the check is the manifest schema's (manifest.py), and
manifest.read_manifest reads published datasets through tfds_manifest.py.
"""

from __future__ import annotations

import os
import re
import shutil

from radfm_jax.data.manifest import read_records, validate_records
from radfm_jax.data.store import VolumeStore
from radfm_jax.data.tfds_manifest import (DATASET_NAME, DATASET_VERSION, builder_class,
                                          tfds_module)
from radfm_jax.errors import InputError, writing


def _source_rows(data: str) -> list[dict]:
  # Validated against the manifest schema as training reads it (ids unique, field types, split
  # names): a row training would refuse is not published.
  if os.path.isdir(data):
    store = VolumeStore(data)
    if not os.path.isfile(store.manifest_path):
      raise FileNotFoundError(f'{data}: not a store (no {os.path.basename(store.manifest_path)})')
    return read_records(store.manifest_path, form='store')
  if not os.path.isfile(data):
    raise FileNotFoundError(f'{data}: no such file (expected a store directory or a manifest '
                            'JSONL)')
  return read_records(data, form=None)


def publish_manifest(data, out_dir: str, *, overwrite: bool = False) -> str:
  """Writes the rows of `data` (a store directory, a manifest JSONL, or a list of row dicts) as
  an ArrayRecord TFDS dataset under `out_dir`; returns its directory (out_dir/radfm_samples/1.0.0).
  """
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'--out {out_dir}: exists and is not a folder; expected the TFDS data '
                          'folder to write into')
  if isinstance(data, (str, os.PathLike)):
    rows = _source_rows(os.fspath(data))
  else:
    rows = validate_records(list(data), form=None)
  if not rows:
    raise ValueError(f'{data}: no manifest rows to publish')
  splits: dict[str, list[dict]] = {}
  for n, row in enumerate(rows):
    split = row.get('split', 'train')
    if not isinstance(split, str) or not re.fullmatch(r'\w+', split) or split == 'all':
      raise InputError(f'row {n} (id {row.get("id")!r}): split {split!r} is not a TFDS split name '
                       "(letters, digits, underscore; not 'all', which TFDS reserves)")
    splits.setdefault(split, []).append(row)
  target = os.path.join(out_dir, DATASET_NAME, DATASET_VERSION)
  # The new version is built in a staging data dir and moved in only when complete, so a kill
  # (even SIGKILL) while TFDS writes leaves the old version in place (it used to be moved aside
  # before the write, and a kill left neither at `target`). With --overwrite the old one is aside
  # only between the two renames; a refused write (or Ctrl-C) puts it back. Both folders sit
  # outside the dataset folder, where TFDS would take them for versions.
  staging = os.path.join(out_dir, f'.{DATASET_NAME}-{DATASET_VERSION}.new')
  aside = os.path.join(out_dir, f'.{DATASET_NAME}-{DATASET_VERSION}.replaced')
  if os.path.isdir(aside) and not os.path.exists(target):
    os.rename(aside, target)          # a publish killed between its two renames: the old version
  if os.path.exists(target) and not overwrite:
    raise FileExistsError(f'{target} exists (publish with overwrite=True / --overwrite to '
                          'replace it)')
  tfds = tfds_module()
  try:
    with writing(target):                    # TFDS removes its incomplete folder itself
      shutil.rmtree(staging, ignore_errors=True)     # left by a killed publish
      shutil.rmtree(aside, ignore_errors=True)
      builder = builder_class()(splits=splits, data_dir=staging, file_format='array_record')
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if os.path.exists(target):
        os.rename(target, aside)
      os.rename(os.path.join(staging, DATASET_NAME, DATASET_VERSION), target)
  except BaseException:
    if os.path.exists(aside) and not os.path.exists(target):
      os.rename(aside, target)
    raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  shutil.rmtree(aside, ignore_errors=True)
  return target
