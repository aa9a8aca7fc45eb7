"""A sample manifest as a TFDS ArrayRecord dataset (the `tfds` extra; `radfm-jax publish`).

    radfm-jax publish --data STORE --out DIR          # -> DIR/radfm_samples/1.0.0
    path = publish_manifest('STORE', 'DIR')           # a store, its manifest.jsonl, or any JSONL
    records = read_tfds_manifest(path, split='train')

Each manifest row becomes one example `{'id': text, 'record': text}`, `record` being the row as
JSON, so any keys a manifest carries survive unchanged and in order (shuffling is disabled).
Splits are the rows' `split` field (default 'train'). The volumes stay in the TensorStore store
that the rows' image ids point to: the dataset is the part to share, version and browse with TFDS
tooling. Neither writing nor reading needs TensorFlow: reading goes through
`builder.as_data_source(split)` (ArrayRecord, random access) into `grain.MapDataset.source`.
`data.manifest` (training) may name such a directory instead of a JSONL file
(`manifest.read_manifest`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil

from radfm_jax.errors import writing

DATASET_NAME = 'radfm_samples'
DATASET_VERSION = '1.0.0'


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError('TFDS datasets need the `tfds` extra: pip install '
                              '"radfm-jax[tfds]" (tensorflow-datasets, no TensorFlow)') from e
  tfds.disable_progress_bar()
  return tfds


@functools.cache
def _builder_class():
  """The GeneratorBasedBuilder, defined once per process (TFDS registers builders by class)."""
  tfds = _tfds()

  class LocalInfo(tfds.core.DatasetInfo):
    """The dataset's info, never looked up in TFDS's GCS bucket: these datasets exist only where
    they are published. TFDS's own lookup, run by every builder of a dataset not yet prepared,
    makes an empty temporary folder it never removes (one left in /tmp per publish), even with
    GCS access disabled, as it is by default."""

    def initialize_from_bucket(self) -> None:
      pass

  class RadfmSamples(tfds.core.GeneratorBasedBuilder):
    """RadFM training samples: one manifest row (JSON) per example."""
    VERSION = tfds.core.Version(DATASET_VERSION)

    def __init__(self, *, splits=None, **kwargs):
      self._splits = splits
      super().__init__(**kwargs)

    def _info(self):
      return LocalInfo(
          builder=self, disable_shuffling=True,
          description='RadFM samples (radfm-jax manifest rows as JSON; volumes in the store).',
          features=tfds.features.FeaturesDict({'id': tfds.features.Text(),
                                               'record': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(rows) for name, rows in self._splits.items()}

    def _generate_examples(self, rows):
      for i, row in enumerate(rows):
        yield i, {'id': str(row.get('id', i)), 'record': json.dumps(row)}

  return RadfmSamples


def _source_rows(data: str) -> list[dict]:
  # The store's JSONL reader, not manifest.read_manifest: that one dispatches to this module.
  # Validated against the manifest schema as training reads it (ids unique, field types, split
  # names): a row training would refuse is not published.
  from radfm_jax.data.manifest import read_records
  from radfm_jax.data.store import VolumeStore
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
    from radfm_jax.data.manifest import validate_records
    rows = validate_records(list(data), form=None)
  if not rows:
    raise ValueError(f'{data}: no manifest rows to publish')
  splits: dict[str, list[dict]] = {}
  for n, row in enumerate(rows):
    split = row.get('split', 'train')
    if not isinstance(split, str) or not re.fullmatch(r'\w+', split) or split == 'all':
      from radfm_jax.errors import InputError
      raise InputError(f'row {n} (id {row.get("id")!r}): split {split!r} is not a TFDS split name '
                       "(letters, digits, underscore; not 'all', which TFDS reserves)")
    splits.setdefault(split, []).append(row)
  target = os.path.join(out_dir, DATASET_NAME, DATASET_VERSION)
  # --overwrite moves the old version aside until the new one is complete: a write the disk
  # refuses (or Ctrl-C) then puts it back instead of leaving neither. Outside the dataset folder,
  # where TFDS would take it for a version.
  aside = os.path.join(out_dir, f'.{DATASET_NAME}-{DATASET_VERSION}.replaced')
  if os.path.exists(target):
    if not overwrite:
      raise FileExistsError(f'{target} exists (publish with overwrite=True / --overwrite to '
                            'replace it)')
    shutil.rmtree(aside, ignore_errors=True)        # left by a publish killed while replacing
    os.rename(target, aside)
  tfds = _tfds()
  try:
    with writing(target):                    # TFDS removes its incomplete folder itself
      builder = _builder_class()(splits=splits, data_dir=out_dir, file_format='array_record')
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  except BaseException:
    if os.path.exists(aside) and not os.path.exists(target):
      os.rename(aside, target)
    raise
  shutil.rmtree(aside, ignore_errors=True)
  return os.fspath(builder.data_dir)


def read_tfds_manifest(path: str, split: str | None = None) -> list[dict]:
  """The manifest rows of a published dataset directory: one split, or all splits in order."""
  if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
    from radfm_jax.errors import InputError
    raise InputError(f'{path}: not a TFDS dataset directory (no dataset_info.json); expected a '
                     'JSONL manifest or a folder `radfm-jax publish` wrote')
  import grain
  builder = _tfds().builder_from_directory(path)
  names = list(builder.info.splits.keys())
  if split is not None and split not in names:
    raise ValueError(f'{path}: no split {split!r} (splits: {names})')
  rows = []
  for name in ([split] if split is not None else names):
    source = builder.as_data_source(name)
    rows.extend(grain.MapDataset.source(source).map(lambda e: json.loads(e['record'])))
  return rows
