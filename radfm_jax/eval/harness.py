"""Evaluation: generate for every sample of a manifest (or an ingested store) and score it.

    radfm-jax eval --checkpoint ckpt/ --data STORE_or_manifest.jsonl --tokenizer tokenizer.model \\
        --out eval_out/ [--batch-size 4] [--limit 100] [--entities auto|none|scispacy|terms:FILE]

Writes `OUT/predictions.jsonl` (id, question, reference, prediction, kind, task per sample, in
input order) and `OUT/summary.json` (closed-ended accuracy, BLEU-1..4, ROUGE-1/2/L, token F1, the
entity precision / recall when an extractor is available, overall and per task, with the sampling
settings and tool versions). Python: `evaluate(model, tokenizer, samples, sampling=GenerateConfig(),
...)`; the command is `radfm-jax eval` (radfm_jax/cli/eval.py).

Samples: a VolumeStore directory (its manifest.jsonl, scans read from the store) or a raw ingest
manifest (image `path`s read with the ingest readers). The question is formatted exactly as for
training (`batch.record_text`: templates, image blocks at their positions); images placed in
the answer are moved to the end of the question, since the answer is what is generated. The
reference is the answer. `kind` is the record's `kind` if given, else 'closed' for yes/no tasks,
records with options, and answers that are yes/no or one option letter; else 'open'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from radfm_jax.eval import entities as entities_lib
from radfm_jax.eval import metrics as metrics_lib

METRIC_NOTES = {
    'closed_accuracy': 'normalised exact match on closed samples (yes/no: first word; options: letter)',
    'bleu': 'corpus BLEU-n, cumulative, sacrebleu 13a tokenizer, lowercased, in [0, 1], open samples',
    'rouge': 'mean per-sample F-measure, rouge-score, no stemming, open samples',
    'token_f1': 'mean per-sample SQuAD-style token F1, open samples',
    'entities': 'macro entity precision / recall over samples with entities (see eval/entities.py)',
}


# ------------------------------------------------------------------------------------------------
# Samples


@dataclasses.dataclass
class Sample:
  index: int                 # position in the input (outputs keep input order)
  record: dict               # the manifest record
  kind: str
  task: str
  source: object             # VolumeStore, or the raw manifest's folder (str)


def _kind(record: dict) -> str:
  if record.get('kind') in ('closed', 'open'):
    return record['kind']
  if record.get('task') == 'diagnosis_yes_no' or record.get('yes_no') or record.get('options') \
      or record.get('choices'):
    return 'closed'
  return 'closed' if metrics_lib.is_closed(str(record.get('answer', ''))) else 'open'


def load_samples(data: str, limit: int | None = None) -> list[Sample]:
  """A store directory (or its manifest.jsonl) or a raw manifest -> samples."""
  from radfm_jax.data.manifest import read_records
  from radfm_jax.data.store import VolumeStore
  path = os.path.abspath(data)
  if os.path.isfile(path) and os.path.isdir(os.path.join(os.path.dirname(path), 'volumes')):
    path = os.path.dirname(path)                     # STORE/manifest.jsonl -> the store
  if os.path.isdir(path):
    source = VolumeStore(path)
    records = source.manifest()
  else:
    source = os.path.dirname(path)
    records = read_records(path, form='input')      # checked line by line (data/manifest.py)
  records = records[:limit] if limit else records
  return [Sample(i, r, _kind(r), str(r.get('task') or ''), source) for i, r in enumerate(records)]


def read_sample_images(sample: Sample) -> tuple[list, list[str], list[dict]]:
  """(arrays [C, H, W, D], modalities, manifest image entries, one per array)."""
  from radfm_jax.data.readers import read_scan
  from radfm_jax.data.store import VolumeStore
  arrays, mods, entries = [], [], []
  for entry in sample.record.get('images', []):
    if isinstance(sample.source, VolumeStore):
      arrays.append(sample.source.read(entry['id']))
      mods.append(str(entry.get('modality') or ''))
      entries.append(entry)
      continue
    for array, attrs in read_scan(os.path.join(sample.source, entry['path']), entry):
      arrays.append(array)                            # a 5D case .npy gives several images
      mods.append(str(attrs.get('modality') or ''))
      entries.append(entry)
  return arrays, mods, entries


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
                         batch_size: int = 1, seed: int = 0, log=None) -> list[dict]:
  """One row per sample (input order): id, question, reference, prediction, kind, task."""
  from radfm_jax.infer.text import generate_batch
  cfg = model.cfg
  max_images = min(cfg.max_images, tokenizer.max_images)
  # Samples with the same image count batch together (fewer padded image slots and programs).
  order = sorted(samples, key=lambda s: len(s.record.get('images', [])))
  rows: dict[int, dict] = {}
  start = time.perf_counter()
  for first in range(0, len(order), batch_size):
    chunk = order[first:first + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))   # one program per shape
    prompts, images, mods, refs = [], [], [], []
    for s in padded:
      arrays, modalities, entries = read_sample_images(s)
      question, answer, n = format_question(s, entries, cfg.perceiver.num_latents, max_images)
      prompts.append(question)
      images.append(arrays[:n])
      mods.append(modalities[:n])
      refs.append(answer)
    texts = generate_batch(model, tokenizer, prompts, images, modalities=mods, sampling=sampling,
                           data_cfg=data_cfg, seed=seed + first)
    for s, question, ref, text in zip(chunk, prompts, refs, texts):
      rows[s.index] = {'id': s.record.get('id', str(s.index)), 'question': _plain(question),
                       'reference': ref, 'prediction': text, 'kind': s.kind, 'task': s.task}
    done = min(first + batch_size, len(order))
    print(f'eval: {done}/{len(order)} samples ({done / (time.perf_counter() - start):.2f}/s)',
          file=log or sys.stderr)
  return [rows[s.index] for s in samples]


def _plain(question: str) -> str:
  """The question with image blocks shown as one `<image>` marker each."""
  import re
  return re.sub(r'<image>(?:<image\d+>)*</image>', '<image>', question)


def score(rows: list[dict], extractor=None, extractor_reason: str = '') -> dict:
  """Metrics of prediction rows, overall and per task (+ entity scores or why they are absent)."""
  preds = [r['prediction'] for r in rows]
  refs = [r['reference'] for r in rows]
  kinds = [r['kind'] for r in rows]
  tasks = [r['task'] or 'default' for r in rows]
  overall = metrics_lib.compute_metrics(preds, refs, kinds, tasks)
  per_task = overall.pop('per_task')
  if extractor is None:
    umls = {'computed': False, 'reason': extractor_reason or 'no entity extractor'}
  else:
    umls = {'computed': True, **entities_lib.entity_scores(preds, refs, extractor)}
    for task, m in per_task.items():
      idx = [i for i, t in enumerate(tasks) if t == task]
      m['entities'] = entities_lib.entity_scores([preds[i] for i in idx], [refs[i] for i in idx],
                                                 extractor)
  return {'overall': overall, 'per_task': per_task, 'entities': umls}


def evaluate(model, tokenizer, samples: list[Sample], *, sampling=None, data_cfg=None,
             batch_size: int = 1, seed: int = 0, extractor=None, extractor_reason: str = '',
             out_dir: str | None = None, info: dict | None = None) -> dict:
  """Generates, scores, and (with out_dir) writes predictions.jsonl + summary.json."""
  from radfm_jax.config import GenerateConfig
  sampling = sampling or GenerateConfig()
  start = time.perf_counter()
  rows = generate_predictions(model, tokenizer, samples, sampling=sampling, data_cfg=data_cfg,
                              batch_size=batch_size, seed=seed)
  seconds = time.perf_counter() - start
  summary = {'n_samples': len(rows), **(info or {}),
             'sampling': dataclasses.asdict(sampling), 'batch_size': batch_size,
             **score(rows, extractor, extractor_reason),
             'metric_notes': METRIC_NOTES,
             'versions': versions(('scispacy', 'spacy') if extractor is not None else ()),
             'timing': {'generate_seconds': seconds,
                        'samples_per_s': len(rows) / seconds if seconds else None}}
  if data_cfg is not None:
    summary['intensity'] = data_cfg.intensity
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'predictions.jsonl'), 'w') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
    with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2, sort_keys=True, default=str)
  return summary
