"""`radfm-jax publish`: manifest rows, checked as training reads them, written as a TFDS
ArrayRecord dataset (data/tfds_manifest.py: the format and its reader).

    path = publish_manifest('STORE', 'DIR')           # a store, its manifest.jsonl, or any JSONL

Here, not in tfds_manifest.py: the check is the manifest schema's (manifest.py), and
manifest.read_manifest reads published datasets through tfds_manifest.py.
"""

from __future__ import annotations

import os
import shutil

from radfm_jax.data.manifest import check_records, record_place, validate_records
from radfm_jax.data.store import VolumeStore, is_url, iter_jsonl
from radfm_jax.data.tfds_manifest import (DATASET_NAME, DATASET_VERSION, builder_class,
                                          tfds_module)
from radfm_jax.errors import InputError, check_parent_folder, where, writing


def _source_rows(data: str) -> tuple[list[dict], list[str]]:
  """(the rows of a store's manifest or a manifest JSONL, where each one's split field is for
  messages: 'FILE line N field split')."""
  # Validated against the manifest schema as training reads it (ids unique, field types, split
  # names): a row training would refuse is not published.
  form = None
  if os.path.isdir(data):
    store = VolumeStore(data)
    if not os.path.isfile(store.manifest_path):
      raise FileNotFoundError(f'{data}: not a store (no {os.path.basename(store.manifest_path)})')
    data, form = store.manifest_path, 'store'
  elif not os.path.isfile(data):
    raise FileNotFoundError(f'{data}: no such file (expected a store directory or a manifest '
                            'JSONL)')
  pairs = list(iter_jsonl(data))
  rows = check_records(pairs, lambda line, field: where(data, line, field), form)
  return rows, [where(data, line, 'split') for line, _ in pairs]


# The types JSON gives back exactly as given (exact types: a subclass such as numpy.float64 or
# an IntEnum comes back as its base type). float NaN / inf round-trip through Python's json.
_JSON_SCALARS = (str, int, float, bool, type(None))
_JSON_VALUES = ('expected JSON values (a dict with string keys, a list, a string, an int, a '
                'float, a bool or None): rows are published as JSON, which would give it back '
                'changed or cannot hold it')


def _type_name(value) -> str:
  t = type(value)
  return t.__qualname__ if t.__module__ == 'builtins' else f'{t.__module__}.{t.__qualname__}'


def _check_json(value, n: int, field: str):
  """InputError naming record `n` (from 1) and the field when `value` would not come back from
  JSON as it is: rows are stored as JSON text (tfds_manifest.py), and a row read back different
  without a word (a tuple as a list, an int key as a string) or a TypeError traceback is what
  this refuses."""
  if type(value) in _JSON_SCALARS:
    return
  if type(value) is list:
    for i, item in enumerate(value):
      _check_json(item, n, f'{field}[{i}]')
  elif type(value) is dict:
    for key, item in value.items():
      if type(key) is not str:
        raise InputError(f'{record_place(n, field)}: key {key!r:.40} (type {_type_name(key)}); '
                         f'{_JSON_VALUES}')
      _check_json(item, n, f'{field}.{key}')
  else:
    raise InputError(f'{record_place(n, field)}: {value!r:.40} (type {_type_name(value)}); '
                     f'{_JSON_VALUES}')


def publish_manifest(data, out_dir: str, *, overwrite: bool = False) -> str:
  """Writes the rows of `data` (a store directory, a manifest JSONL, or a list of row dicts) as
  an ArrayRecord TFDS dataset under `out_dir`; returns its directory (out_dir/radfm_samples/1.0.0).
  Row dicts must hold JSON values only (InputError naming the record and field otherwise): a
  tuple, a non-string key or a numpy scalar would not come back as given.
  """
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'--out {out_dir}: exists and is not a folder; expected the TFDS data '
                          'folder to write into')
  if not is_url(out_dir):        # a broken symlink or an unwritable folder on the way
    check_parent_folder(out_dir, f'--out {out_dir}', 'expected the TFDS data folder to write into')
  if isinstance(data, (str, os.PathLike)):
    rows, places = _source_rows(os.fspath(data))
  else:
    rows = list(data)
    for n, row in enumerate(rows, 1):              # numbered as validate_records numbers them
      if type(row) is dict:                        # not a dict: validate_records says so
        for field, value in row.items():
          if type(field) is not str:
            raise InputError(f'{record_place(n)}: key {field!r:.40} (type {_type_name(field)}); '
                             f'{_JSON_VALUES}')
          _check_json(value, n, field)
    rows = validate_records(rows, form=None)
    places = [record_place(n, 'split') for n in range(1, len(rows) + 1)]
  if not rows:
    raise ValueError(f'{data}: no manifest rows to publish')
  splits: dict[str, list[dict]] = {}
  for row, place in zip(rows, places):
    # a split name the schema took is one TFDS takes too, but for the one it reserves
    split = row.get('split', 'train')
    if split == 'all':
      raise InputError(f'{place}: {split!r} (id {row.get("id")!r}) is not a TFDS split name; '
                       "expected letters, digits, underscore, not 'all' (which TFDS reserves)")
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
