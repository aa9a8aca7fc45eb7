"""A sample manifest as a TFDS ArrayRecord dataset (the `tfds` extra; `radfm-jax publish`).

    radfm-jax publish --data STORE --out DIR          # -> DIR/radfm_samples/1.0.0
    path = publish.publish_manifest('STORE', 'DIR')   # data/publish.py: the rows checked first
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

from radfm_jax.errors import UserError

DATASET_NAME = 'radfm_samples'
DATASET_VERSION = '1.0.0'


class TfdsMissing(UserError, ModuleNotFoundError):
  """The `tfds` extra is not installed: one line (exit 2) saying what to install, like the other
  extras (data/beam_ingest.BeamMissing), not a traceback."""


def tfds_module():
  try:
    import tensorflow_datasets as tfds
  except ModuleNotFoundError as e:
    raise TfdsMissing('TFDS datasets need the `tfds` extra: pip install '
                      '"radfm-jax[tfds]" (tensorflow-datasets, no TensorFlow)') from e
  tfds.disable_progress_bar()
  return tfds


@functools.cache
def builder_class():
  """The GeneratorBasedBuilder, defined once per process (TFDS registers builders by class)."""
  tfds = tfds_module()

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

    # TFDS prints 'Downloading and preparing dataset Unknown size ...' and '... Subsequent calls
    # will reuse this data.' on stdout, naming the staging folder publish builds in (gone once it
    # is moved in place); `radfm-jax publish` says the one path that stays.
    def _log_download_bytes(self) -> None:
      pass

    def _log_download_done(self) -> None:
      pass

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(rows) for name, rows in self._splits.items()}

    def _generate_examples(self, rows):
      for i, row in enumerate(rows):
        yield i, {'id': str(row.get('id', i)), 'record': json.dumps(row)}

  return RadfmSamples


def read_tfds_manifest(path: str, split: str | None = None) -> list[dict]:
  """The manifest rows of a published dataset directory: one split, or all splits in order."""
  if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
    from radfm_jax.errors import InputError
    raise InputError(f'{path}: not a TFDS dataset directory (no dataset_info.json); expected a '
                     'JSONL manifest or a folder `radfm-jax publish` wrote')
  import grain
  builder = tfds_module().builder_from_directory(path)
  names = list(builder.info.splits.keys())
  if split is not None and split not in names:
    raise ValueError(f'{path}: no split {split!r} (splits: {names})')
  rows = []
  for name in ([split] if split is not None else names):
    source = builder.as_data_source(name)
    rows.extend(grain.MapDataset.source(source).map(lambda e: json.loads(e['record'])))
  return rows
