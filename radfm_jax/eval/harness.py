"""Evaluation: generate for every sample of a manifest (or an ingested store) and score it.

    radfm-jax eval --checkpoint ckpt/ --data STORE_or_manifest.jsonl --tokenizer tokenizer.model \\
        --out eval_out/ [--batch-size 4] [--limit 100] [--entities auto|none|scispacy|terms:FILE]

Writes `OUT/predictions.jsonl` (id, question, reference, prediction, kind, task, dataset per
sample, in input order) and `OUT/summary.json` (closed-ended accuracy, BLEU-1..4, ROUGE-1/2/L,
token F1, the entity precision / recall when an extractor is available, overall, per task and per
dataset, with the sampling settings and tool versions); while it runs, its progress in
`OUT/predictions.jsonl.partial` (`Progress`), from which the same call again resumes. Scoring
(`score`) takes prediction rows only, so a predictions.jsonl can be scored again without a model
(`read_predictions`). Python: `evaluate(model, tokenizer, samples, sampling=GenerateConfig(),
...)`; the command is `radfm-jax eval` (radfm_jax/cli/eval.py).

Samples: a VolumeStore directory (its manifest.jsonl, scans read from the store) or a raw ingest
manifest (image `path`s read with the ingest readers), of one split (`load_samples(split=...)`;
the command scores `--split eval` unless told otherwise). A sample whose scan cannot be read is
skipped and counted (summary 'skipped' / 'skipped_samples'), as training does. The question is formatted exactly as for
training (`batch.record_text`: templates, image blocks at their positions); images placed in
the answer are moved to the end of the question, since the answer is what is generated. The
reference is the answer. `kind` is the record's `kind` if given, else 'closed' for the tasks of
`CLOSED_TASKS` (modality, yes/no diagnosis), yes/no records, records with options, and answers
that are yes/no or one option letter; else 'open'.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time

from radfm_jax.data.manifest import (DEFAULT_DATASET, DEFAULT_GROUP, SAMPLE_FIELDS, _shown,
                                     _unknown, check_default_groups, dataset_of)
from radfm_jax.errors import InputError, check_parent_folder, where, writing
from radfm_jax.eval import entities as entities_lib
from radfm_jax.eval import metrics as metrics_lib

METRIC_NOTES = {
    'closed_accuracy': 'normalised exact match on closed samples (yes/no: first word; options: letter)',
    'bleu': 'corpus BLEU-n, cumulative, sacrebleu 13a tokenizer, lowercased, in [0, 1], open samples',
    'rouge': 'mean per-sample F-measure, rouge-score, no stemming, open samples',
    'token_f1': 'mean per-sample SQuAD-style token F1, open samples',
    'entities': 'macro entity precision / recall over samples with entities (see eval/entities.py)',
}
# Tasks scored as closed questions unless a record's `kind` says otherwise.
CLOSED_TASKS = ('modality', 'diagnosis_yes_no')


def _is_str(value) -> bool:
  return isinstance(value, str)


# ------------------------------------------------------------------------------------------------
# Samples


@dataclasses.dataclass
class Sample:
  index: int                 # position in the input (outputs keep input order)
  record: dict               # the manifest record
  kind: str
  task: str
  source: object             # VolumeStore, or the raw manifest's folder (str)
  dataset: str = DEFAULT_DATASET   # the record's `dataset` (manifest.dataset_of)
  # The record's `id`, else its manifest default: the record's number in the whole file, from 0
  # (as ingest stores it), which `read_records` keeps apart from every given id, so no two rows of
  # predictions.jsonl share one. None (a Sample built by hand): the record's id, else `index`.
  id: str | int | None = None

  @property
  def sample_id(self) -> str | int:
    if self.id is not None:
      return self.id
    return self.record.get('id', str(self.index))


def _kind(record: dict) -> str:
  if record.get('kind') in ('closed', 'open'):
    return record['kind']
  if record.get('task') in CLOSED_TASKS or record.get('yes_no') or record.get('options') \
      or record.get('choices'):
    return 'closed'
  return 'closed' if metrics_lib.is_closed(str(record.get('answer', ''))) else 'open'


def load_samples(data: str, limit: int | None = None, split: str | None = None) -> list[Sample]:
  """A store directory (or its manifest.jsonl) or a raw manifest -> samples of `split` (None:
  every row; a row without a `split` field is 'train', as for training). InputError when `data`
  does not exist or the split has no rows (naming the splits there are)."""
  from radfm_jax.data.manifest import read_records
  from radfm_jax.data.store import VolumeStore
  path = os.path.abspath(data)
  if not os.path.exists(path):
    raise InputError(f'{data}: no such store directory or manifest file')
  if os.path.isfile(path) and os.path.isdir(os.path.join(os.path.dirname(path), 'volumes')):
    path = os.path.dirname(path)                     # STORE/manifest.jsonl -> the store
  if os.path.isdir(path):
    source = VolumeStore(path)
    manifest = source.manifest_path
  else:
    source, manifest = os.path.dirname(path), path
  # the store's own manifest (store form), or a raw one (input form: images by path)
  records = read_records(manifest, form='store' if isinstance(source, VolumeStore) else 'input')
  # A record without an id gets the manifest's default, its number in the whole file (from 0),
  # before the split is chosen: its number in the split could equal another record's given id,
  # and eval's own predictions.jsonl would then be refused for a repeated id.
  chosen = [(r['id'] if 'id' in r else str(n), r) for n, r in enumerate(records)]
  if split is not None:
    chosen = [(i, r) for i, r in chosen if str(r.get('split', 'train')) == split]
    if not chosen:
      present = collections.Counter(str(r.get('split', 'train')) for r in records)
      raise InputError(f'{manifest}: no samples in split {split!r} (splits here: '
                       f'{dict(sorted(present.items())) or "none, the manifest is empty"}); '
                       'choose one with --split NAME, or --split all')
  chosen = chosen[:limit] if limit else chosen
  return [Sample(i, r, _kind(r), str(r.get('task') or ''), source, dataset_of(r), sample_id)
          for i, (sample_id, r) in enumerate(chosen)]


class UnreadableScan(InputError):
  """A sample's scan could not be read: `scan` (store id or path), `reason`."""

  def __init__(self, scan: str, error: Exception):
    self.scan = scan
    # a TensorStore error repeats its whole spec: keep the message to one readable line
    self.reason = f'{type(error).__name__}: {error}'.split(' [tensorstore_spec=')[0]
    super().__init__(f'scan {scan}: {self.reason}')


def read_sample_images(sample: Sample) -> tuple[list, list[str], list[dict], list[bool]]:
  """(arrays [C, H, W, D], modalities, manifest image entries, whether each is an image of a
  RadFM case stack (`store.case_image`: a volume whatever its depth), one per array);
  UnreadableScan naming the first scan that cannot be read."""
  from radfm_jax.data.readers import read_scan
  from radfm_jax.data.store import VolumeStore, case_image
  arrays, mods, entries, stacked = [], [], [], []
  for entry in sample.record.get('images', []):
    if isinstance(sample.source, VolumeStore):
      try:
        arrays.append(sample.source.read(entry['id']))
      except Exception as e:     # missing id, damaged chunk: whatever TensorStore raises
        raise UnreadableScan(str(entry.get('id')), e) from e
      mods.append(str(entry.get('modality') or ''))
      entries.append(entry)
      stacked.append(sample.source.case_image(entry['id']))
      continue
    path = os.path.join(sample.source, str(entry.get('path')))
    try:
      read = read_scan(path, entry)
    except Exception as e:       # RejectedScan, a reader's own error, OSError
      raise UnreadableScan(path, e) from e
    for array, attrs in read:
      arrays.append(array)                            # a 5D case .npy gives several images
      mods.append(str(attrs.get('modality') or ''))
      entries.append(entry)
      stacked.append(case_image(attrs))
  return arrays, mods, entries, stacked


def format_question(sample: Sample, entries: list[dict], num_latents: int,
                    max_images: int) -> tuple[str, str, int]:
  """(question with image blocks, reference answer, images used): the batch contract's generation
  text (`batch.record_text`) of the record with `entries` (one per read array) as its images."""
  from radfm_jax.data.batch import record_text
  return record_text(dict(sample.record, images=entries), num_latents, max_images,
                     generation=True)


# ------------------------------------------------------------------------------------------------
# Evaluation


def versions(extra: tuple[str, ...] = ()) -> dict:
  from importlib import metadata
  out = {}
  for dist in ('radfm-jax', 'jax', 'jaxlib', 'flax', 'rouge-score', 'sacrebleu') + extra:
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = None
  if out['radfm-jax'] is None:
    import radfm_jax
    out['radfm-jax'] = getattr(radfm_jax, '__version__', None)
  return out


def generate_predictions(model, tokenizer, samples: list[Sample], *, sampling, data_cfg,
                         batch_size: int = 1, seed: int = 0, progress: bool = True,
                         skipped: list | None = None,
                         log: Progress | None = None) -> list[dict]:
  """One row per sample whose scans could be read (input order): id, question, reference,
  prediction, kind, task, dataset.

  `log` (a `Progress`): the samples it already holds are taken from it, not generated again, and
  each batch (each skipped sample) is added to it as it is done; the batches and their seeds are
  those of a run that was never interrupted, so the rows are the same.

  A sample with an unreadable scan is skipped and appended to `skipped` ({'sample_id',
  'scan_id', 'reason'}, as training's `PipelineStats.skipped`), unless `data_cfg.drop_unreadable`
  is False: then it is an InputError naming the sample. A question that does not fit the model's
  positions with `sampling.max_new_tokens` is an InputError naming it, before anything is
  generated. A tqdm bar on stderr counts samples
  unless `progress` is False.
  """
  from tqdm import tqdm

  from radfm_jax.infer.text import check_prompt_fits, generate_batch, image_limit
  cfg = model.cfg
  max_images = image_limit(tokenizer, cfg)
  drop = data_cfg is None or data_cfg.drop_unreadable
  # Every question (with its record's image blocks) must fit the model's positions with the new
  # tokens: checked for all samples before any is generated, as generate's prompt files are
  # (`prompt_files.check_items`), so a long question late in the split fails at once instead of
  # discarding the answers generated before it. (A raw manifest's 5D stack may read as more
  # images than its record lists: `generate_batch` checks each batch again.)
  for s in samples:
    question = format_question(s, s.record.get('images', []), cfg.perceiver.num_latents,
                               max_images)[0]
    name = _sample_name(s)
    check_prompt_fits(len(tokenizer.encode(question, source=name)), cfg, sampling.max_new_tokens,
                      name)
  skipped = skipped if skipped is not None else []
  # Samples with the same image count batch together (fewer padded image slots and programs).
  order = sorted(samples, key=lambda s: len(s.record.get('images', [])))
  rows: dict[int, dict] = dict(log.rows) if log else {}
  skipped.extend(entry for _, entry in (log.skipped if log else ()))
  # Done before: whole batches, a prefix of `order`'s batches, and the samples skipped so far.
  done_before = set(rows) | {i for i, _ in (log.skipped if log else ())}
  pending: list[tuple] = []       # (sample, question, reference, arrays, modalities, stacked)

  def flush(bar):
    padded = pending + [pending[-1]] * (batch_size - len(pending))   # one program per shape
    texts = generate_batch(model, tokenizer, [p[1] for p in padded], [p[3] for p in padded],
                           modalities=[p[4] for p in padded], stacked=[p[5] for p in padded],
                           sampling=sampling,
                           data_cfg=data_cfg, seed=seed + done[0],
                           names=[_sample_name(p[0]) for p in padded])
    batch = [(s.index, prediction_row(s, question, ref, text))
             for (s, question, ref, *_), text in zip(pending, texts)]
    if log:
      log.add_rows(batch)
    rows.update(batch)
    done[0] += len(pending)
    bar.update(len(pending))
    pending.clear()

  done = [len(rows)]               # samples generated: the next batch's seed offset
  with tqdm(total=len(order), initial=len(done_before), desc='eval', unit='sample',
            disable=not progress, dynamic_ncols=True) as bar:
    for s in order:
      if s.index in done_before:
        continue
      try:
        arrays, modalities, entries, stacked = read_sample_images(s)
      except UnreadableScan as e:    # as in training (data/pipeline.py): count it, go on
        if not drop:
          raise InputError(f'{_sample_name(s)}: {e} (data.drop_unreadable=False)') from e
        skipped.append({'sample_id': s.sample_id, 'scan_id': e.scan,
                        'reason': e.reason})
        if log:
          log.add_skipped(s.index, skipped[-1])
        bar.update(1)
        bar.set_postfix(skipped=len(skipped))
        continue
      question, answer, n = format_question(s, entries, cfg.perceiver.num_latents, max_images)
      pending.append((s, question, answer, arrays[:n], modalities[:n], stacked[:n]))
      if len(pending) == batch_size:
        flush(bar)
    if pending:
      flush(bar)
  return [rows[s.index] for s in samples if s.index in rows]


def _sample_name(sample: Sample) -> str:
  return f'sample {sample.sample_id!r}'


def prediction_row(sample: Sample, question: str, reference: str, prediction: str) -> dict:
  """One line of predictions.jsonl: what `score` reads (reference, prediction, kind, task,
  dataset) with the sample's id and its question (image blocks as `<image>`)."""
  return {'id': sample.sample_id, 'question': _plain(question),
          'reference': reference, 'prediction': prediction, 'kind': sample.kind,
          'task': sample.task, 'dataset': sample.dataset}


def _row_place(n: int, field: str | None = None) -> str:
  """Where a prediction row passed to `score` is, for messages: 'prediction row N [field F]'."""
  return f'prediction row {n}' + (f' field {field}' if field else '')


def _plain(question: str) -> str:
  """The question with image blocks shown as one `<image>` marker each."""
  import re
  return re.sub(r'<image>(?:<image\d+>)*</image>', '<image>', question)


def score(rows: list[dict], extractor=None, extractor_reason: str = '',
          entity_tasks: tuple[str, ...] | None = None) -> dict:
  """Metrics of prediction rows (id, reference, prediction, kind, task[, dataset]): overall, per
  task and per dataset (rows without a task / dataset: group 'default'), each a
  `metrics.compute_metrics` dict, plus entity scores or why they are absent. A task or dataset
  named 'default' next to rows without one is an InputError (`manifest.check_default_groups`):
  the two would be one table row. `entity_tasks`: the tasks whose samples the entity scores cover
  (None: every sample); a table row holding none of them gets `entities: None`."""
  check_default_groups(enumerate(rows, 1), _row_place)
  preds = [r['prediction'] for r in rows]
  refs = [r['reference'] for r in rows]
  kinds = [r['kind'] for r in rows]
  tasks = [r['task'] or DEFAULT_GROUP for r in rows]
  datasets = [dataset_of(r) for r in rows]
  overall = metrics_lib.compute_metrics(preds, refs, kinds, tasks)
  per_task = overall.pop('per_task')
  per_dataset = {}
  for name in sorted(set(datasets)):
    idx = [i for i, d in enumerate(datasets) if d == name]
    per_dataset[name] = metrics_lib.compute_metrics([preds[i] for i in idx],
                                                    [refs[i] for i in idx],
                                                    [kinds[i] for i in idx])
  if extractor is None:
    umls = {'computed': False, 'reason': extractor_reason or 'no entity extractor'}
  else:
    covered = [i for i, t in enumerate(tasks) if entity_tasks is None or t in entity_tasks]
    pred_sets = dict(zip(covered, extractor.extract_many([preds[i] for i in covered])))
    ref_sets = dict(zip(covered, extractor.extract_many([refs[i] for i in covered])))

    def scores(idx):
      return entities_lib.set_scores([pred_sets[i] for i in idx], [ref_sets[i] for i in idx],
                                     extractor.name) if idx else None
    umls = {'computed': True, 'tasks': list(entity_tasks) if entity_tasks is not None else 'all',
            **(scores(covered) or {'extractor': extractor.name, 'n_samples': 0})}
    for table, keys in ((per_task, tasks), (per_dataset, datasets)):
      for name, m in table.items():
        m['entities'] = scores([i for i in covered if keys[i] == name])
  # A sample without a reference answer scores 0 on every text metric: counted, so the figures
  # are not read as the model's (the ids listed in summary.json, a line said by the CLI).
  without = [str(r.get('id')) for r in rows if not metrics_lib.has_reference(r['reference'])]
  return {'overall': overall, 'per_task': per_task, 'per_dataset': per_dataset, 'entities': umls,
          'no_reference': {'n': len(without), 'ids': without}}


# The fields of a predictions.jsonl row (what `prediction_row` writes): name -> (check, what is
# expected, required). `score` reads reference, prediction, kind, task and dataset; id and
# question are carried for the reader. The manifest's wording of a type is reused, so one field
# reads the same in both files.
_MANIFEST_FIELDS = {f.name: f for f in SAMPLE_FIELDS}
PREDICTION_FIELDS = {
    'id': (_MANIFEST_FIELDS['id'].check, _MANIFEST_FIELDS['id'].type, False),
    'question': (_is_str, 'string', False),
    'reference': (_is_str, 'string (the reference answer)', True),
    'prediction': (_is_str, 'string (the generated answer)', True),
    'kind': (_MANIFEST_FIELDS['kind'].check, _MANIFEST_FIELDS['kind'].type, True),
    'task': (_is_str, 'string ("" for none)', True),
    'dataset': (_is_str, 'string', False),
}
ROWS_EVAL_WRITES = 'the rows `radfm-jax eval` writes to OUT/predictions.jsonl'


def read_predictions(path: str) -> list[dict]:
  """The rows of a predictions.jsonl written by `evaluate`, checked against `PREDICTION_FIELDS`
  (InputError naming the file, line and field): a wrong kind or type would otherwise surface as
  a bare error deep in scoring, or a misspelled field be silently ignored. Ids must be unique (a
  sample counted twice would skew every score), and the file must hold a row."""
  from radfm_jax.data.store import iter_jsonl
  if os.path.isdir(path):
    raise InputError(f'{path}: a folder; expected a predictions file (OUT/predictions.jsonl of '
                     '`radfm-jax eval`)')
  if not os.path.isfile(path):
    raise InputError(f'{path}: no such predictions file (expected OUT/predictions.jsonl of '
                     '`radfm-jax eval`)')
  rows, seen, lines = [], {}, []
  for line, row in iter_jsonl(path):
    for key in row:
      near = _unknown(key, PREDICTION_FIELDS) if key not in PREDICTION_FIELDS else None
      if near is not None:
        raise InputError(f'{where(path, line, key)}: unknown field (did you mean {near}?); '
                         f'expected {ROWS_EVAL_WRITES}')
    for field, (check, expected, required) in PREDICTION_FIELDS.items():
      if field not in row:
        if required:
          raise InputError(f'{where(path, line, field)}: missing; expected {expected}, as in '
                           f'{ROWS_EVAL_WRITES}')
      elif not check(row[field]):
        raise InputError(f'{where(path, line, field)}: got {_shown(row[field])}; expected '
                         f'{expected}')
    if 'id' in row:
      key = str(row['id'])
      if key in seen:
        raise InputError(f'{where(path, line, "id")}: {_shown(key)} is already used '
                         f'({where(path, seen[key])}); expected one row per sample')
      seen[key] = line
    rows.append(row)
    lines.append(line)
  if not rows:
    raise InputError(f'{path}: no rows; expected {ROWS_EVAL_WRITES}, one per sample')
  check_default_groups(zip(lines, rows), lambda line, field: where(path, line, field))
  return rows


# What `evaluate` writes in its out_dir (`rescore` writes only the summary); and, while it runs,
# its progress (`Progress`), removed once the outputs are in place.
OUTPUTS = ('predictions.jsonl', 'summary.json')
PROGRESS = 'predictions.jsonl.partial'


def check_out_dir(out_dir: str, name: str = 'out_dir', files: tuple[str, ...] = OUTPUTS,
                  reads: tuple[tuple[str, str | None], ...] = ()):
  """InputError naming `name` (e.g. '--out') when `out_dir` cannot hold `files`: it, or the
  nearest of its parents that exists, is not a folder, it goes through a broken symlink, or one of
  `files` is a folder; WriteError when its folder cannot be written (`check_parent_folder`).
  `reads`: (flag, path) of the files the run reads, none of which may be one it writes (an eval
  with --data OUT/predictions.jsonl wrote its predictions over its manifest). Checked before
  generating, so a bad --out fails at once, not after every sample is generated."""
  from radfm_jax.checkpoint import meta
  path = os.path.abspath(out_dir)
  shown = f'{name} {out_dir}'
  expected = f'expected a folder (new or existing) for {" and ".join(files)}'
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f'{shown}: exists and is not a directory; {expected}')
  check_parent_folder(path, shown, expected)
  meta.check_outside_checkpoint(path, shown, f'{expected} outside its config.json, params/ and '
                                'step folders')
  for file in files + ((PROGRESS,) if 'predictions.jsonl' in files else ()):
    written = os.path.join(out_dir, file)
    if os.path.isdir(written):
      raise InputError(f'{shown}: {written} is a folder; expected it to be a file (eval writes '
                       f'its {file} there) or absent')
    for flag, read in reads:
      if read and os.path.isfile(read) and os.path.exists(written) and os.path.samefile(
          read, written):
        raise InputError(f'{flag} {read}: is {written}, which eval writes; expected {name} '
                         'another folder')


class Progress:
  """OUT/predictions.jsonl.partial: what an eval has done so far, so an interrupted run (Ctrl-C,
  SIGTERM, a kill, a lost machine) is resumed by running it again instead of started over.

  Line 1 is a header holding the run's `key` (what makes a rerun the same run: the samples, the
  model and tokenizer, the decoding and preprocessing settings); each further line one batch of
  prediction rows ({"rows": [[sample index, row], ...]}) or one skipped sample ({"skipped":
  [index, entry]}), appended, flushed and fsynced when it is done. A whole batch is one line, so
  a resumed run forms the same batches (and seeds) as one never interrupted; a last line cut by a
  kill (no newline) is that batch not done, dropped. A header with another key, or a line that
  is not one of these, is an InputError naming the file (and the first differing field): rerun as
  before, or delete the file to start over.
  """

  VERSION = 1

  def __init__(self, out_dir: str, key: dict, samples: list[Sample]):
    self.path = os.path.join(out_dir, PROGRESS)
    from radfm_jax.train.rundir import flat_fields    # (pulls in JAX: not at module import)
    self.key = flat_fields(json.loads(json.dumps(key, default=str)))     # as it reads back
    self.rows: dict[int, dict] = {}
    self.skipped: list[tuple[int, dict]] = []
    os.makedirs(out_dir, exist_ok=True)
    with writing(self.path):
      if not self._resume(samples):
        with open(self.path, 'w', encoding='utf-8') as f:
          self._append(f, {'eval_progress': self.VERSION, 'key': self.key})
      self.file = open(self.path, 'a', encoding='utf-8')

  @property
  def done(self) -> int:
    return len(self.rows) + len(self.skipped)

  def _append(self, f, record: dict):
    f.write(json.dumps(record) + '\n')
    f.flush()
    os.fsync(f.fileno())

  def _refuse(self, line: int | None, problem: str):
    raise InputError(f'{where(self.path, line)}: {problem}; expected the progress file '
                     '`radfm-jax eval` writes: rerun the eval as it was to resume it, or delete '
                     'the file to start over')

  def _resume(self, samples: list[Sample]) -> bool:
    """Reads an existing file (False when there is none, or no sample in it)."""
    if not os.path.exists(self.path):
      return False
    with open(self.path, 'rb') as f:
      raw = f.read()
    cut = raw[raw.rfind(b'\n') + 1:]            # a write a kill cut short: that batch is not done
    if cut:
      with open(self.path, 'r+b') as f:
        f.truncate(len(raw) - len(cut))
    lines = raw[:len(raw) - len(cut)].split(b'\n')[:-1]
    if len(lines) <= 1:
      return False            # no sample done (e.g. a question refused up front): nothing to keep
    parsed = []
    for n, line in enumerate(lines, 1):
      try:
        parsed.append(json.loads(line))
      except ValueError:
        self._refuse(n, 'not a JSON line')
    header = parsed[0]
    if not (isinstance(header, dict) and header.get('eval_progress') == self.VERSION
            and isinstance(header.get('key'), dict)):
      self._refuse(1, 'not the header of an eval\'s progress')
    old = header['key']
    for field in sorted(set(old) | set(self.key)):
      if old.get(field) != self.key.get(field):
        raise InputError(
            f'{self.path}: the progress of an interrupted eval with another {field} (was '
            f'{_shown(old.get(field))}, now {_shown(self.key.get(field))}); expected the same '
            'samples, checkpoint and settings: rerun the eval as it was to resume it, or delete '
            'the file to start over')
    for n, record in enumerate(parsed[1:], 2):
      pairs = record.get('rows') if isinstance(record, dict) else None
      if isinstance(record, dict) and 'skipped' in record:
        pairs = [record['skipped']]
      if not isinstance(pairs, list) or not pairs:
        self._refuse(n, 'neither a batch of rows nor a skipped sample')
      for pair in pairs:
        index, value = pair if isinstance(pair, list) and len(pair) == 2 else (None, None)
        if not (isinstance(index, int) and 0 <= index < len(samples) and isinstance(value, dict)
                and value.get('id' if 'rows' in record else 'sample_id')
                == samples[index].sample_id):
          self._refuse(n, f'{_shown(pair)} is not a sample of this eval')
        if index in self.rows or any(i == index for i, _ in self.skipped):
          self._refuse(n, f'sample {samples[index].sample_id!r} is there twice')
        if 'rows' in record:
          self.rows[index] = value
        else:
          self.skipped.append((index, value))
    return True

  def add_rows(self, rows: list[tuple[int, dict]]):
    with writing(self.path):
      self._append(self.file, {'rows': [list(pair) for pair in rows]})
    self.rows.update(rows)

  def add_skipped(self, index: int, entry: dict):
    with writing(self.path):
      self._append(self.file, {'skipped': [index, entry]})
    self.skipped.append((index, entry))

  def close(self):
    self.file.close()

  def kept(self) -> int:
    """The samples the file holds in whole lines, read back (after `close`): an interrupt may
    land between a line's write and the count kept in memory."""
    with open(self.path, 'rb') as f:
      lines = f.read().split(b'\n')[1:-1]        # the header; a cut last line
    n = 0
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        n += len(record.get('rows') or ()) + ('skipped' in record)
    return n


def run_key(model, tokenizer, samples: list[Sample], *, sampling, data_cfg, batch_size: int,
            seed: int, info: dict | None = None) -> dict:
  """What makes a rerun of an eval the same run, so its `Progress` may be resumed: the samples
  (ids and manifest rows), the model config, the tokenizer, decoding, preprocessing, batch size
  and seed, and `info` (the command adds the checkpoint, its step and when its tree was
  written, the data path and split)."""
  import hashlib
  digest = hashlib.sha256()
  for s in samples:
    digest.update(json.dumps([s.sample_id, s.record], sort_keys=True, default=str).encode())
  # the model file's bytes (`Tokenizer` keeps them: picklable)
  proto = getattr(tokenizer, '_proto', None)
  return {'samples': len(samples), 'samples_sha256': digest.hexdigest(),
          'model': dataclasses.asdict(model.cfg) if dataclasses.is_dataclass(
              getattr(model, 'cfg', None)) else None,
          'tokenizer_sha256': hashlib.sha256(proto).hexdigest() if proto else None,
          'sampling': dataclasses.asdict(sampling), 'batch_size': batch_size, 'seed': seed,
          'preprocessing': dataclasses.asdict(data_cfg) if data_cfg is not None else None,
          **(info or {})}


def evaluate(model, tokenizer, samples: list[Sample], *, sampling=None, data_cfg=None,
             batch_size: int = 1, seed: int = 0, extractor=None, extractor_reason: str = '',
             out_dir: str | None = None, info: dict | None = None,
             progress: bool = True, scorer=None, key: dict | None = None) -> dict:
  """Generates, scores (`scorer(rows, extractor, extractor_reason)`, default `score`;
  `radbench.score` for the RadBench recipe), and (with out_dir) writes predictions.jsonl +
  summary.json.

  summary['skipped'] counts the samples left out for an unreadable scan and
  summary['skipped_samples'] lists them (see `generate_predictions`).

  With out_dir, the progress goes to OUT/predictions.jsonl.partial as it is made (`Progress`):
  an interrupted call, made again with the same samples and settings (`run_key` of them, `info`
  and `key`), resumes where it stopped (summary['resumed']: the samples it took from there); a
  call with others is an InputError naming the file. The file is removed once the outputs are
  written."""
  from radfm_jax.config import GenerateConfig
  if out_dir:
    check_out_dir(out_dir)
  sampling = sampling or GenerateConfig()
  log = None
  if out_dir:
    log = Progress(out_dir, run_key(model, tokenizer, samples, sampling=sampling,
                                    data_cfg=data_cfg, batch_size=batch_size, seed=seed,
                                    info={**(info or {}), **(key or {})}), samples)
  resumed, resumed_rows = (log.done, len(log.rows)) if log else (0, 0)
  start = time.perf_counter()
  skipped: list[dict] = []
  try:
    rows = generate_predictions(model, tokenizer, samples, sampling=sampling,
                                data_cfg=data_cfg, batch_size=batch_size, seed=seed,
                                progress=progress, skipped=skipped, log=log)
  except KeyboardInterrupt as e:
    if log is None:
      raise
    log.close()
    kept = (f'{log.kept()} of {len(samples)} samples kept in {log.path}; run the same command '
            'again to resume')
    raise KeyboardInterrupt(f'{e}; {kept}' if str(e) else kept) from None
  finally:
    if log:
      log.close()
  seconds = time.perf_counter() - start
  generated = len(rows) - resumed_rows        # by this call
  # Samples naming more images than the model takes: the first max_images are used, as training
  # uses them (data/pipeline.py plan_notes), and said here, not in silence.
  from radfm_jax.infer.text import image_limit
  max_images = image_limit(tokenizer, model.cfg)
  past = [{'sample_id': s.sample_id, 'images': len(s.record.get('images', []))}
          for s in samples if len(s.record.get('images', [])) > max_images]
  summary = {'n_samples': len(rows), 'skipped': len(skipped), 'skipped_samples': skipped,
             'images_left_out': {'max_images': max_images, 'samples': past},
             'resumed': resumed, **(info or {}),
             'sampling': dataclasses.asdict(sampling), 'batch_size': batch_size, 'seed': seed,
             **({'checkpoint_step': key['checkpoint_step']} if key and 'checkpoint_step' in key
                else {}),
             **(scorer or score)(rows, extractor, extractor_reason),
             'metric_notes': METRIC_NOTES,
             'versions': versions(('scispacy', 'spacy') if extractor is not None else ()),
             'timing': {'generate_seconds': seconds,
                        'samples_per_s': generated / seconds if seconds else None}}
  if data_cfg is not None:
    summary['intensity'] = data_cfg.intensity
  if out_dir:
    _write_outputs(out_dir, {'predictions.jsonl': ''.join(json.dumps(r) + '\n' for r in rows),
                             'summary.json': _summary_text(summary)})
    with writing(log.path):
      os.remove(log.path)        # last: a kill before it leaves a run resumed with nothing to do
  return summary


# The fields of an eval's summary.json that come from generating, not from scoring.
_RUN_FIELDS = ('checkpoint', 'data', 'split', 'sampling', 'skipped', 'skipped_samples',
               'images_left_out', 'seed', 'checkpoint_step')


def rescore(predictions: str, *, extractor=None, extractor_reason: str = '', scorer=None,
            out_dir: str | None = None, info: dict | None = None) -> dict:
  """Scores a predictions.jsonl again, without a model (`read_predictions`, then `scorer`,
  default `score`); with out_dir writes OUT/summary.json (the predictions file is left as it is)."""
  same_run = False       # out_dir is the folder of `predictions` (by any path to it)
  if out_dir:
    check_out_dir(out_dir, files=('summary.json',), reads=(('--predictions', predictions),))
    beside = os.path.join(out_dir, 'predictions.jsonl')
    same_run = (os.path.exists(beside) and os.path.exists(predictions)
                and os.path.samefile(beside, predictions))
    if os.path.exists(beside) and not same_run:
      # its summary.json would then describe predictions other than those beside it
      raise InputError(f'--out {out_dir}: holds the predictions.jsonl of another eval; expected '
                       f'the folder of {predictions} or one without a predictions.jsonl')
    check_replaces(out_dir, overwrite=True)
  rows = read_predictions(predictions)
  # What only the generating run knew (its checkpoint, split, sampling, the samples it skipped):
  # kept from the summary.json beside its predictions.jsonl when the rescore replaces it, so the
  # record of a skip is not lost.
  kept = {}
  old = os.path.join(out_dir, 'summary.json') if same_run else None
  if old and os.path.isfile(old):
    try:
      with open(old) as f:
        previous = json.load(f)
      kept = {k: previous[k] for k in _RUN_FIELDS if k in previous} if isinstance(
          previous, dict) else {}
    except (OSError, ValueError):
      kept = {}                 # not a summary we wrote: nothing to keep
  summary = {'n_samples': len(rows), 'predictions': os.path.abspath(predictions), **kept,
             **(info or {}), **(scorer or score)(rows, extractor, extractor_reason),
             'metric_notes': METRIC_NOTES,
             'versions': versions(('scispacy', 'spacy') if extractor is not None else ())}
  if out_dir:
    _write_outputs(out_dir, {'summary.json': _summary_text(summary)})
  return summary


def _is_eval_summary(path: str) -> bool:
  """Whether the JSON file at `path` is a summary.json an eval wrote (`evaluate`, `rescore`)."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(data, dict) and 'metric_notes' in data and 'n_samples' in data


def check_replaces(out_dir: str, overwrite: bool, name: str = '--out'):
  """InputError naming `name` when writing an eval's outputs into `out_dir` would replace what
  it must not: a summary.json that is not an eval's (the demo's), ever; a finished eval's
  predictions.jsonl / summary.json unless `overwrite` (`radfm-jax eval --overwrite`; a rescore
  replaces its own summary.json: its caller checks the predictions beside it)."""
  summary = os.path.join(out_dir, 'summary.json')
  if os.path.isfile(summary) and not _is_eval_summary(summary):
    raise InputError(f'{name} {out_dir}: holds a summary.json that is not an eval\'s (no '
                     '"metric_notes": another command\'s, e.g. the demo\'s), which eval would '
                     'replace; expected another folder')
  found = [f for f in OUTPUTS if os.path.isfile(os.path.join(out_dir, f))]
  if found and not overwrite:
    raise InputError(f'{name} {out_dir}: holds the {" and ".join(found)} of a finished eval; '
                     'expected a new folder, or --overwrite to replace them')


def _summary_text(summary: dict) -> str:
  return json.dumps(summary, indent=2, sort_keys=True, default=str)


def _write_outputs(out_dir: str, texts: dict[str, str]):
  """Writes OUT/<name> = text for each item, summary.json last, so the folder never pairs a new
  predictions.jsonl with an older run's summary.json, nor holds a cut file: every file goes to
  `<name>.tmp` first (a refused write, a full disk: a WriteError naming it, the .tmp files
  removed, the previous outputs as they were), then the old summary.json is removed and each file
  renamed into place. A kill between the renames leaves predictions.jsonl without a summary.json,
  which says the eval did not finish."""
  os.makedirs(out_dir, exist_ok=True)
  names = sorted(texts, key=lambda n: n == 'summary.json')
  tmps = {n: os.path.join(out_dir, n + '.tmp') for n in names}
  try:
    for name in names:
      with writing(os.path.join(out_dir, name)), open(tmps[name], 'w', encoding='utf-8') as f:
        f.write(texts[name])
  except BaseException:
    for tmp in tmps.values():
      if os.path.exists(tmp):
        os.remove(tmp)
    raise
  summary = os.path.join(out_dir, 'summary.json')
  with writing(summary):
    if 'predictions.jsonl' in texts and os.path.exists(summary):
      os.remove(summary)
    for name in names:
      os.replace(tmps[name], os.path.join(out_dir, name))
