"""The demo (`radfm-jax demo`): build the demo data, train `small` on CPU, evaluate, generate.

    radfm-jax demo                       # the full demo into demo_out/ (about 15 minutes on 2 cores)
    radfm-jax demo --quick --out /tmp/q  # tiny model, tiny data, a few steps (the end-to-end test)
    summary = run_demo('/tmp/q', quick=True)   # Python: the same, returns the summary dict

Steps (each prints one line; outputs in --out):
  1. data/       the demo dataset (radfm_jax.data.demo): augmented copies of real scans shipped in
                 pydicom / pydicom-data / nibabel / nilearn, and 3D phantoms with known lesions;
                 samples.jsonl with train / heldout splits.
  2. store/      `ingest` of samples.jsonl into a VolumeStore.
  3. tokenizer.model  SentencePiece trained on the demo texts (vocab = model.llama.vocab_size).
  4. train/      the project's training loop (progress bar, metrics.jsonl, Orbax checkpoint at the
                 end). Training stops at train.steps or when --time-budget seconds have passed.
                 The first `demo.closed_first` fraction of the steps sees closed questions only
                 (see `Curriculum`), the rest every train sample.
  5. Evaluation of the held-out split with the checkpoint restored from disk: every held-out
     question is answered by greedy generation (KV-cache decoding, stop at </s>). Closed questions
     score normalised exact match (radfm_jax.eval.metrics.closed_accuracy) against chance =
     1 / number of options; reports score ROUGE-L. predictions.jsonl holds every answer.
  6. loss_curve.png, summary.json, and one generated answer for a held-out scan on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time

DEFAULT_CONFIG = 'configs/demo.py'


class TimeBudget:
  """Wraps a batch iterator and ends it (StopIteration) once `seconds` have passed, so the training
  loop stops at a step boundary and writes its final checkpoint."""

  def __init__(self, iterator, seconds: float | None):
    self.iterator = iterator
    self.deadline = None if not seconds else time.monotonic() + seconds
    self.expired = False

  def __iter__(self):
    return self

  def __next__(self):
    if self.deadline is not None and time.monotonic() > self.deadline:
      self.expired = True
      raise StopIteration
    return next(self.iterator)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


class Curriculum:
  """Batches from `first` for `first_steps` steps, then from `then` (both endless iterators).

  Why the demo needs it: trained on the full mix from step 0, the from-scratch decoder first learns
  the long templated reports (~40 answer tokens each against 1-2 for a closed answer), and the
  cheapest way to do that is to make the 32 image tokens the same for every scan (their
  scan-to-scan spread fell to ~0.005 against ~0.7 within a scan in 150 steps, and never recovered).
  Closed questions alone have almost no text to learn, so their gradient goes into the image
  path (lesion yes/no 1.0 held-out after 150 steps); once the decoder reads the image tokens,
  adding the reports no longer flattens them. get_state / set_state cover both iterators and the
  phase (JSON), so a resumed run continues in the same place.
  """

  def __init__(self, first, then, first_steps: int):
    self.first, self.then, self.first_steps = first, then, int(first_steps)
    self.count = 0

  def __iter__(self):
    return self

  def __next__(self):
    source = self.first if self.count < self.first_steps else self.then
    batch = next(source)
    self.count += 1
    return batch

  def get_state(self):
    return {'count': self.count, 'first': self.first.get_state(), 'then': self.then.get_state()}

  def set_state(self, state):
    self.count = int(state['count'])
    self.first.set_state(state['first'])
    self.then.set_state(state['then'])


class TowerLog:
  """The train loop's `on_step` callback keeping the per-tower `grad_norm/<module>` and
  `update_ratio/<module>` metrics (radfm_jax/train/step.py); `summary()` gives each one's mean
  over the first and the last `window` steps."""

  def __init__(self, window: int = 10):
    self.window = window
    self.rows: list[dict] = []

  def __call__(self, step: int, values: dict):
    self.rows.append({k: v for k, v in values.items()
                      if k.startswith(('grad_norm/', 'update_ratio/'))})

  def summary(self) -> dict:
    out: dict = {}
    for part, rows in (('first', self.rows[:self.window]), ('last', self.rows[-self.window:])):
      for key in sorted({k for r in rows for k in r}):
        metric, tower = key.split('/', 1)
        values = [r[key] for r in rows if key in r]
        out.setdefault(tower, {})[f'{metric}_{part}'] = sum(values) / len(values)
    return out


def _log(msg: str):
  print(f'[demo] {msg}', file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Steps


def build_data(out: str, quick: bool, seed: int, rebuild: bool) -> tuple[str, dict, bool]:
  """(data folder, dataset summary, whether it was (re)built now)."""
  from radfm_jax.data import demo as demo_data
  sizes = demo_data.DemoSizes.quick() if quick else demo_data.DemoSizes()
  data_dir = os.path.join(out, 'data')
  stamp = json.dumps({'sizes': dataclasses.asdict(sizes), 'seed': seed}, sort_keys=True)
  stamp_path = os.path.join(data_dir, 'build.json')
  if not rebuild and os.path.exists(stamp_path) and open(stamp_path).read() == stamp:
    with open(os.path.join(data_dir, 'dataset.json')) as f:
      _log(f'data: reusing {data_dir}')
      return data_dir, json.load(f), False
  shutil.rmtree(data_dir, ignore_errors=True)
  summary = demo_data.build_demo_dataset(data_dir, sizes, seed=seed, log=sys.stderr)
  with open(stamp_path, 'w') as f:
    f.write(stamp)
  return data_dir, summary, True


def ingest_data(out: str, data_dir: str, rebuilt: bool) -> tuple[str, dict]:
  from radfm_jax.data.ingest import ingest
  store_dir = os.path.join(out, 'store')
  if rebuilt:
    shutil.rmtree(store_dir, ignore_errors=True)
  report = ingest(os.path.join(data_dir, 'samples.jsonl'), store_dir, strict=True)
  return store_dir, {'stored': len(report.stored), 'already_stored': len(report.skipped),
                     'rejected': len(report.rejects), 'samples': report.samples}


def train_tokenizer(out: str, records: list[dict], vocab_size: int) -> str:
  from radfm_jax.data.tokenizer import corpus_lines, train_sentencepiece
  path = os.path.join(out, 'tokenizer.model')
  train_sentencepiece(corpus_lines(records), path, vocab_size=vocab_size)
  return path


def _batch_for_generation(records, store, tokenizer, cfg, rows: int) -> dict:
  """Held-out records -> the `generate_ids` arrays (batch.record_inputs rows, left-padded
  prompts, `cfg.data.max_images` image slots), padded to `rows` with copies of the last record."""
  from radfm_jax.data.batch import generation_shape, record_inputs
  from radfm_jax.infer.text import collate_prompts
  out = []
  for rec in records + [records[-1]] * (rows - len(records)):
    entries = rec['images'][:cfg.data.max_images]
    arrays = [store.read(im['id']) for im in entries]
    shape = generation_shape([x.shape[3] for x in arrays], cfg.data, cfg.generate.image_shape)
    out.append(record_inputs(rec, arrays, tokenizer, cfg.data, generation=True, shape=shape,
                             slots=cfg.data.max_images,
                             stacked=[store.case_image(im['id']) for im in entries]))
  return collate_prompts(out)


def answer_heldout(model, records, store, tokenizer, cfg, batch_rows: int = 16,
                   max_new_tokens: int | None = None) -> list[str]:
  """Answers for `records` decoded by `cfg.generate` (greedy by default; its sampling, layer loop
  and cache chunks as `radfm-jax generate` / `eval` use them), `max_new_tokens` replacing its own;
  grouped by image shape so each group is one compiled program."""
  from radfm_jax.infer.generate import generate_ids
  sampling = dataclasses.replace(cfg.generate,
                                 max_new_tokens=max_new_tokens or cfg.generate.max_new_tokens)
  groups: dict = {}
  for i, rec in enumerate(records):
    depth = max(int(im['shape'][3]) for im in rec['images'])
    groups.setdefault(depth > 1, []).append(i)
  answers = [''] * len(records)
  for idx in groups.values():
    for start in range(0, len(idx), batch_rows):
      chunk = idx[start:start + batch_rows]
      batch = _batch_for_generation([records[i] for i in chunk], store, tokenizer, cfg,
                                    batch_rows)
      out = generate_ids(model, batch['tokens'], batch['attention_mask'], batch['images'],
                         batch['image_mask'], sampling=sampling)
      for i, seq in zip(chunk, out.sequences()):
        answers[i] = tokenizer.decode(seq).strip()
  return answers


def score(records: list[dict], answers: list[str]) -> dict:
  """Closed accuracy (with chance) per family/task and overall; ROUGE-L of open answers."""
  from radfm_jax.eval.metrics import closed_accuracy, closed_match, rouge_l
  out = {'closed': {}, 'open': {}}
  groups: dict = {}
  for rec, ans in zip(records, answers):
    key = f"{rec['family']}/{rec['task']}"
    if rec.get('kind') == 'closed':
      key = f"{key}:{'/'.join(rec['options'])}"
    groups.setdefault((rec.get('kind'), key), []).append((rec, ans))
  closed_all = []
  for (kind, key), items in sorted(groups.items()):
    preds = [a for _, a in items]
    refs = [r['answer'] for r, _ in items]
    if kind == 'closed':
      chance = sum(1.0 / len(r['options']) for r, _ in items) / len(items)
      majority = max(refs.count(r) for r in set(refs)) / len(refs)
      out['closed'][key] = {'n': len(items), 'accuracy': closed_accuracy(preds, refs),
                            'chance': chance, 'majority_baseline': majority,
                            'answered_an_option': sum(
                                any(closed_match(a, o) for o in r['options'])
                                for r, a in items) / len(items)}
      closed_all += items
    else:
      out['open'][key] = {'n': len(items), 'rouge_l': rouge_l(preds, refs),
                          'exact': sum(a.strip() == r['answer'].strip() for r, a in items) / len(items)}
  if closed_all:
    for family in ('phantom', 'real', None):
      items = [(r, a) for r, a in closed_all if family is None or r['family'] == family]
      if not items:
        continue
      name = 'all' if family is None else family
      out['closed_' + name] = {
          'n': len(items),
          'accuracy': closed_accuracy([a for _, a in items], [r['answer'] for r, _ in items]),
          'chance': sum(1.0 / len(r['options']) for r, _ in items) / len(items)}
  opens = [(r, a) for r, a in zip(records, answers) if r.get('kind') != 'closed']
  if opens:
    out['rouge_l'] = rouge_l([a for _, a in opens], [r['answer'] for r, _ in opens])
  return out


# ------------------------------------------------------------------------------------------------
# The whole demo


@dataclasses.dataclass
class DemoSetup:
  """Steps 1-3 done: the config (store and tokenizer set), the store, the manifest split."""
  cfg: object
  store: object
  tokenizer_path: str
  train: list
  heldout: list
  data_summary: dict
  ingest_summary: dict
  timings: dict


def config_spec(config: str | None, quick: bool) -> str:
  """The experiment `run_demo` trains: `config`, else configs/demo.py (`model=tiny` if quick)."""
  return config or (f'{DEFAULT_CONFIG}:model=tiny' if quick else DEFAULT_CONFIG)


def host_allocator(config: str | None, overrides=(), quick: bool = False) -> str:
  """`mesh.host_allocator` of the demo's experiment, read before the demo builds anything (the
  command restarts with it; the full config is validated in `setup`)."""
  from radfm_jax.config import load_config_dict
  return load_config_dict(config_spec(config, quick), overrides).mesh.host_allocator


# The data fields `setup` sets itself (data.manifest: the demo reads the store's splits).
DEMO_DATA_FIELDS = ('data.store', 'data.tokenizer', 'data.manifest')


def setup(out: str, *, config: str | None = None, overrides=(), steps: int | None = None,
          quick: bool = False, seed: int = 0, rebuild: bool = False) -> DemoSetup:
  """The config (`run_demo`'s arguments; checked first: a bad value costs no data build), then
  steps 1-3 of the module doc (data, ingest, tokenizer); the data is reused when OUT/data was
  built with the same sizes and seed."""
  from radfm_jax.config import ConfigError, load_config, load_config_dict, override_key
  from radfm_jax.data.store import VolumeStore
  spec = config_spec(config, quick)
  given, overrides = list(overrides), [f'seed={seed}']
  for item in given:       # the demo's own data replaces them below: accepted, they did nothing
    if override_key(item) in DEMO_DATA_FIELDS:
      raise ConfigError(f'override {item!r}: the demo trains on the data it builds (OUT/store, '
                        f'OUT/tokenizer.model); expected no {" / ".join(DEMO_DATA_FIELDS)} '
                        'override (to train on a store of yours: radfm-jax train)')
  if quick:
    overrides += ['train.steps=20', 'train.warmup_steps=2', 'train.learning_rate=2e-3',
                  'data.batch_size_2d=8', 'data.batch_size_3d=8', 'generate.max_new_tokens=12']
  if steps is not None:
    overrides += [f'train.steps={steps}']
  overrides += given
  raw = load_config_dict(spec, overrides)
  # the experiment's warmup under fewer steps (e.g. --steps 20 under the demo's 30) is cut to a
  # tenth of them; a warmup the caller gave is theirs (too long: an error naming it)
  warmup_given = any(override_key(o) == 'train.warmup_steps' for o in given)
  if raw.train.warmup_steps >= raw.train.steps and not warmup_given:
    overrides += [f'train.warmup_steps={max(raw.train.steps // 10, 0)}']
  demo_cfg = raw.get('demo')
  delay = float(demo_cfg.get('decoder_delay', 0.0)) if demo_cfg is not None else 0.0
  if delay > 0 and not raw.train.lr_delays:           # a fraction of the steps, as closed_first
    overrides += [f"train.lr_delays=[['llama/layers/.*', {int(round(raw.train.steps * delay))}]]"]
  base_cfg = load_config(spec, overrides)     # a bad value fails before the data is built
  timings = {}
  t = time.perf_counter()
  data_dir, data_summary, rebuilt = build_data(out, quick, seed, rebuild)
  timings['build_data_s'] = time.perf_counter() - t
  t = time.perf_counter()
  store_dir, ingest_summary = ingest_data(out, data_dir, rebuilt)
  timings['ingest_s'] = time.perf_counter() - t

  store = VolumeStore(store_dir)
  records = store.manifest()
  t = time.perf_counter()
  tok_path = train_tokenizer(out, records, base_cfg.model.llama.vocab_size)
  timings['tokenizer_s'] = time.perf_counter() - t
  cfg = load_config(spec, overrides + [f'data.store={store_dir}', f'data.tokenizer={tok_path}'])
  return DemoSetup(cfg, store, tok_path, [r for r in records if r['split'] == 'train'],
                   [r for r in records if r['split'] == 'heldout'], data_summary,
                   ingest_summary, timings)


def training_batches(cfg, store, tokenizer, train_records: list[dict], log=_log):
  """The demo's endless training iterator: the Grain pipeline over `train_records`, behind the
  closed-questions-first phase (`Curriculum`, `demo.closed_first` of the steps) when set."""
  from radfm_jax.data.pipeline import make_dataset
  batches = iter(make_dataset(cfg.data, cfg.model, store, tokenizer, seed=cfg.seed,
                              records=train_records, augment=True))
  demo_cfg = cfg.extra.get('demo') if cfg.extra is not None else None
  closed_steps = int(round(cfg.train.steps * float(demo_cfg.closed_first))) if demo_cfg else 0
  closed_records = [r for r in train_records if r.get('kind') == 'closed']
  if closed_steps and closed_records:
    first = make_dataset(cfg.data, cfg.model, store, tokenizer, seed=cfg.seed,
                         records=closed_records, augment=True)
    batches = Curriculum(iter(first), batches, closed_steps)
    log(f'steps 1-{closed_steps}: the {len(closed_records)} closed questions only; then all '
        f'{len(train_records)} train samples')
  return batches


def vision_probes(store, heldout: list[dict], data_cfg) -> dict:
  """Probe sets (radfm_jax.eval.vision) of the held-out scans, one per family: `real` (one probe
  per scan, labelled with its modality, body part where known, and source) and `phantom`
  (labelled lesion yes/no and side)."""
  from radfm_jax.eval.vision import probe_set
  out = {}
  for family, keys in (('real', ('modality', 'body_part', 'source')),
                       ('phantom', ('lesion', 'side'))):
    by_image: dict = {}
    for rec in heldout:
      if rec['family'] != family:
        continue
      image_id = rec['images'][0]['id']
      merged = by_image.setdefault(image_id, dict(rec, label={}))
      label = dict(rec.get('label') or {}, source=rec.get('source'))
      merged['label'].update({k: v for k, v in label.items() if k in keys})
    if by_image:
      out[family] = probe_set(store, list(by_image.values()), data_cfg)
  return out


def run_demo(out: str = 'demo_out', *, config: str | None = None, overrides=(),
             steps: int | None = None, time_budget: float = 900.0, quick: bool = False,
             seed: int = 0, rebuild: bool = False, resume: bool = False,
             progress: bool = True) -> dict:
  """Steps 1-6 of the module doc; returns the summary (also in OUT/summary.json).

  config: experiment config spec (default DEFAULT_CONFIG, `:model=tiny` with quick); overrides:
  'a.b=value' applied after the demo's own; steps: train.steps; time_budget: seconds of training
  (0 = no limit); quick: tiny model, tiny dataset, 20 steps; resume: continue from OUT/train.
  """
  t_start = time.perf_counter()
  from radfm_jax.errors import InputError, check_parent_folder
  expected = 'expected a folder for the demo\'s outputs (new, or one a demo wrote)'
  if os.path.exists(out) and not os.path.isdir(out):
    raise InputError(f'--out {out}: exists and is not a folder; {expected}')
  check_parent_folder(out, f'--out {out}', expected)   # a broken symlink, a read-only disk
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  run = setup(out, config=config, overrides=overrides, steps=steps, quick=quick, seed=seed,
              rebuild=rebuild)
  cfg, store, tok_path, timings = run.cfg, run.store, run.tokenizer_path, run.timings
  train_records, heldout = run.train, run.heldout
  data_summary, ingest_summary = run.data_summary, run.ingest_summary
  _log(f'{len(train_records)} train / {len(heldout)} held-out samples; tokenizer '
       f'{cfg.model.llama.vocab_size} pieces; model {cfg.model.size}')

  # 4. training
  import jax
  import numpy as np
  from flax import nnx
  from radfm_jax.data.tokenizer import Tokenizer
  from radfm_jax.models.radfm import count_params
  from radfm_jax.train import loop
  from radfm_jax.checkpoint import Checkpointer
  tokenizer = Tokenizer(tok_path, max_images=cfg.model.max_images,
                        num_latents=cfg.model.perceiver.num_latents)
  workdir = os.path.join(out, 'train')
  if not resume:
    shutil.rmtree(workdir, ignore_errors=True)
  data = TimeBudget(training_batches(cfg, store, tokenizer, train_records), time_budget)
  mesh, rules, graphdef, tx, abs_state, _ = loop.build(cfg)
  n_params = count_params(abs_state.params)
  _log(f'training {cfg.model.size} ({n_params / 1e6:.1f}M parameters) for {cfg.train.steps} steps '
       f'(batch {cfg.data.batch_size_3d}; time budget {time_budget:.0f} s) on '
       f'{jax.device_count()} {jax.devices()[0].platform} device(s)')
  t = time.perf_counter()
  towers = TowerLog()
  result = loop.train(cfg, workdir, data=data, progress=progress, on_step=towers)
  timings['train_s'] = time.perf_counter() - t
  losses = dict(result.losses)
  if not losses:
    # --resume of a finished run trains no step: the losses its earlier calls logged (one per
    # train.log_every steps) rather than nan
    from radfm_jax.train.metrics import read_metrics
    losses = {r['step']: r['loss'] for r in read_metrics(workdir, 'train') if 'loss' in r}
  loss_first = float(np.mean([losses[s] for s in sorted(losses)[:10]])) if losses else math.nan
  loss_last = float(np.mean([losses[s] for s in sorted(losses)[-10:]])) if losses else math.nan
  _log(f'trained {result.step} steps in {timings["train_s"]:.0f} s '
       f'({"stopped by the time budget" if data.expired else result.status}); loss '
       f'{loss_first:.3f} (first 10 steps) -> {loss_last:.3f} (last 10); checkpoint step '
       f'{result.last_checkpoint} in {workdir}/checkpoints')

  # 5. held-out evaluation, from the checkpoint on disk
  t = time.perf_counter()
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)   # Orbax lists every item it was not asked for
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  state, _ = ckpt.restore(result.last_checkpoint, abs_state)
  ckpt.close()
  model = nnx.merge(graphdef, state.params)
  answers = answer_heldout(model, heldout, store, tokenizer, cfg)
  metrics = score(heldout, answers)
  timings['eval_s'] = time.perf_counter() - t
  t = time.perf_counter()
  from radfm_jax.eval.vision import vision_report
  vision = {family: vision_report(model, probe)
            for family, probe in vision_probes(store, heldout, cfg.data).items()}
  vision['towers'] = towers.summary()
  timings['vision_report_s'] = time.perf_counter() - t
  with open(os.path.join(out, 'predictions.jsonl'), 'w') as f:
    for rec, ans in zip(heldout, answers):
      f.write(json.dumps({'id': rec['id'], 'family': rec['family'], 'task': rec['task'],
                          'kind': rec.get('kind'), 'question': rec['question'],
                          'reference': rec['answer'], 'prediction': ans}) + '\n')

  # 6. outputs
  from radfm_jax.train.metrics import plot_losses
  try:
    plot_losses(losses, os.path.join(out, 'loss_curve.png'),
                f'radfm-jax demo: {cfg.model.size}, {result.step} steps')
  except ImportError as e:  # matplotlib is a dependency; a broken install may lack it
    _log(f'no loss_curve.png ({e}); pip install matplotlib')
  example = next((i for i, r in enumerate(heldout)
                  if r['family'] == 'phantom' and r['task'] == 'report' and r['label']['lesion']),
                 0)
  rec = heldout[example]
  timings['total_s'] = time.perf_counter() - t_start
  summary = {
      'model': cfg.model.size, 'parameters': n_params, 'steps': result.step,
      'stopped_by_time_budget': data.expired, 'batch_size': cfg.data.batch_size_3d,
      'loss_first10': loss_first, 'loss_last10': loss_last,
      'checkpoint': os.path.join(workdir, 'checkpoints', str(result.last_checkpoint)),
      'dataset': {'splits': data_summary['splits'], 'by_task': data_summary['by_task'],
                  'sources': [s['name'] for s in data_summary['sources']],
                  'missing_sources': data_summary['missing_sources']},
      'ingest': ingest_summary, 'metrics': metrics, 'vision': vision, 'timings': timings,
      'example': {'id': rec['id'], 'question': rec['question'], 'reference': rec['answer'],
                  'prediction': answers[example]},
  }
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def report_text(s: dict, out: str) -> str:
  """The human-readable report of a `run_demo` summary (what `radfm-jax demo` prints)."""
  m = s['metrics']
  lines = ['', '=== radfm-jax demo ===',
           f"model {s['model']} ({s['parameters'] / 1e6:.1f}M params), {s['steps']} steps in "
           f"{s['timings']['train_s']:.0f} s; loss {s['loss_first10']:.3f} -> {s['loss_last10']:.3f}",
           'held-out closed questions (greedy generation, normalised exact match):']
  for key, v in m['closed'].items():
    lines.append(f"  {key:46s} n={v['n']:3d}  accuracy {v['accuracy']:.3f}  (chance "
                 f"{v['chance']:.3f}, majority answer {v['majority_baseline']:.3f})")
  for name in ('phantom', 'real', 'all'):
    v = m.get('closed_' + name)
    if v:
      lines.append(f"  {'ALL ' + name:46s} n={v['n']:3d}  accuracy {v['accuracy']:.3f}  "
                   f"(chance {v['chance']:.3f})")
  for key, v in m['open'].items():
    lines.append(f"held-out {key}: n={v['n']} ROUGE-L {v['rouge_l']:.3f}")
  vision = s.get('vision') or {}
  for family in ('real', 'phantom'):
    v = vision.get(family)
    if v:
      sep = ', '.join(f"{k} {r['accuracy']:.2f} (majority {r['majority']:.2f})"
                      for k, r in v['separability'].items())
      lines.append(f"image tokens, {family} scans (n={v['n']}): spread across scans "
                   f"{v['spread']['across']:.3f} / within a scan {v['spread']['within']:.3f}; "
                   f"1-NN {sep}")
  ex = s['example']
  lines += ['', f"held-out scan {ex['id']}:", f"  Q: {ex['question']}",
            f"  generated: {ex['prediction']}", f"  reference: {ex['reference']}", '',
            f'outputs: {out}/summary.json, loss_curve.png, predictions.jsonl, '
            f'train/checkpoints/']
  return '\n'.join(lines)


__all__ = ['Curriculum', 'DemoSetup', 'TimeBudget', 'TowerLog', 'setup', 'training_batches',
           'vision_probes', 'answer_heldout', 'report_text', 'run_demo', 'score']
