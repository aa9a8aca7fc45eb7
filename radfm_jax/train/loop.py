"""The training loop behind `radfm-jax train --config radfm:model=tiny --workdir DIR
--config.data.store=STORE --config.data.tokenizer=TOK` (or `--config.data.store=synthetic`).

    result = train(cfg, workdir)      # Python: same thing; `data=` takes any iterator of batch dicts

Per step: this host's batch (numpy) -> global arrays (`jax.make_array_from_process_local_data`)
-> the jitted, donated train step. Each process's rows are its own, so before the first step
`check_batch_rows` refuses a mesh whose batch axes leave two processes the same rows. Metrics are
read one step late (the host never waits for the step it just dispatched) except before a
checkpoint, where the step's loss is checked first.
Outputs in `workdir` (`rundir.py`): checkpoints/ (async Orbax: state, data-iterator state, config;
checkpoints/config.json, the run's one config record, absolute paths), tokenizer.model (a copy),
metrics.jsonl (the train rows also hold the data mixture: `share/<dataset>`, `drawn/<dataset>`,
`mixture_metrics`), tensorboard/ (event files), loss_curve.png (at the end of each call). A run
restarts from the latest checkpoint in `workdir`, which must hold the same config
(`rundir.RESUMABLE` lists what may change). A gs:// workdir holds the checkpoints; the logs then
go to $RADFM_LOGDIR/<run name> (`run_dirs`).

What it prints (process 0, stderr): a start-up summary (parameters, devices and mesh, samples per
split, shape buckets, tokenizer, workdir), "compiling train step for bucket ..." before each new
batch shape (the compile time is kept out of the progress bar's rate and ETA and out of
tokens_per_s), "resumed from step N (data position restored)", a tqdm bar (loss, step/s).

Stops: `train.steps` reached (or `max_steps`); SIGINT (Ctrl-C: status 'interrupted') or SIGTERM
(preemption: status 'preempted') save a checkpoint at the current step, then return (a second
Ctrl-C raises KeyboardInterrupt at once); a non-finite loss (`NonFiniteLossError`: nothing is
saved after the last good checkpoint, which stays intact).

Data: `data.store='synthetic'` -> `SyntheticBatches` (deterministic random batches from the config
shapes); a store folder -> the Grain pipeline `radfm_jax.data.pipeline.make_dataset` over it with
the tokenizer `data.tokenizer`; an empty `data.store` is a ConfigError. With `data.image_cache`
the state is restored first, then the store's image-token cache of its frozen vision tower is
opened (`train/image_cache.open_for_run`), then the pipeline over it, then the data position
(`Checkpointer.restore_data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx

from radfm_jax import hostmem, sharding
from radfm_jax.checkpoint import Checkpointer
from radfm_jax.config import (SYNTHETIC_STORE, Config, ConfigError, check_batch_axes,
                              check_batch_processes, check_data_store, mixture_weights)
from radfm_jax.data import batch as batch_lib
from radfm_jax.errors import InputError
from radfm_jax.models import lora
from radfm_jax.models.radfm import RadFM
from radfm_jax.train import compile_cache
from radfm_jax.train import metrics as metrics_lib
from radfm_jax.train import optim
from radfm_jax.train import rundir
from radfm_jax.train import step as step_lib
from radfm_jax.train.synthetic import SyntheticBatches


class NonFiniteLossError(RuntimeError):
  """The loss became NaN / inf; the run stopped without saving the bad state."""


class UnreadableDataError(InputError):
  """More of the drawn samples were unreadable than `data.max_unreadable_share` allows; the run
  saved a checkpoint and stopped."""


@dataclasses.dataclass
class TrainResult:
  step: int                          # optimizer steps done (state.step) when the run returned
  losses: dict                       # {step: train loss} of the steps run in this call
  status: str                        # 'done' | 'interrupted' (SIGINT) | 'preempted' (SIGTERM)
  last_checkpoint: int | None
  state: object = None               # the final TrainState (device arrays)
  # Samples this host's pipeline dropped to an empty row for an unreadable scan in this call
  # (data.drop_unreadable): [{'sample_id', 'scan_id', 'reason'}], also in LOGDIR/skipped.jsonl.
  skipped: list = dataclasses.field(default_factory=list)


def make_data(cfg: Config, split: str = 'train', image_cache=None):
  """This host's iterator of batch dicts for `split` ('train' or 'eval'); `image_cache`: see
  `open_data`."""
  return open_data(cfg, split, image_cache=image_cache)[0]


def open_data(cfg: Config, split: str = 'train', num_devices: int | None = None, *,
              image_cache=None, periodic_eval: bool = False) -> tuple[object, str]:
  """(this host's iterator of batch dicts for `split`, a one-line description: source, samples
  per split, shape buckets). `image_cache` (an ImageTokenCache, with data.image_cache): batches
  carry each scan's cached image tokens (`image_tokens`) instead of its volume. `periodic_eval`:
  the run will read the manifest's 'eval' split every train.eval_every steps, so a manifest
  without one is a ConfigError here (read once with the train split), not at the first eval.

  Checks, before any model is built: a data source named (`check_data_store`), and the batch size
  of every kind the split holds (2D / 3D; synthetic: 2D) dividing over the mesh's batch axes of
  `num_devices` (default: all) devices (`check_batch_axes`: a ConfigError naming the fields)."""
  store = cfg.data.store
  check_data_store(cfg)                       # empty: a ConfigError naming data.store
  num_devices = num_devices or jax.device_count()
  if store == SYNTHETIC_STORE:
    check_batch_axes(cfg, num_devices, jax.process_count(), ('2d',))
    seed = cfg.seed if split == 'train' else cfg.seed + 7919
    data = SyntheticBatches(cfg, seed=seed, process_index=jax.process_index(),
                            process_count=jax.process_count())
    first = data.make_global(0)
    return data, (f'synthetic (data.store={SYNTHETIC_STORE}): random batches, one bucket '
                  f'{_bucket(first)}')
  from radfm_jax.data.manifest import read_manifest
  from radfm_jax.data.pipeline import make_dataset
  from radfm_jax.data.store import VolumeStore
  from radfm_jax.data.tokenizer import Tokenizer
  # an empty, missing or unreadable data.tokenizer: Tokenizer's InputError names the field
  tokenizer = Tokenizer(cfg.data.tokenizer, max_images=cfg.model.max_images,
                        num_latents=cfg.model.perceiver.num_latents,
                        source='config field data.tokenizer')
  volumes = VolumeStore(store)
  manifest = cfg.data.manifest or volumes.manifest_path
  rows = read_manifest(manifest)
  splits: dict[str, int] = {}
  for row in rows:
    splits[row.get('split', 'train')] = splits.get(row.get('split', 'train'), 0) + 1
  if periodic_eval and cfg.train.eval_every and not splits.get('eval'):
    # else said only at the first eval, eval_every steps into the run
    raise ConfigError(f'config field train.eval_every={cfg.train.eval_every} asks for a periodic '
                      f'eval, but {manifest} has no samples in split \'eval\' (splits here: '
                      f'{splits or "none"}); expected samples with "split": "eval" (docs/data.md) '
                      'or train.eval_every=0')
  records = [r for r in rows if r.get('split', 'train') == split]
  if not records:
    raise InputError(f'{manifest}: no samples in split {split!r} (splits here: {splits or "none"}); '
                     'expected samples with "split": "' + split + '" (docs/data.md)')
  # the training mixture (data.mixture) weighs the train split; any other split is read once
  ds = make_dataset(cfg.data, cfg.model, volumes, tokenizer, seed=cfg.seed, records=records,
                    num_epochs=None if split == 'train' else 1, image_cache=image_cache,
                    augment=split == 'train',
                    mixture=mixture_weights(cfg.data) if split == 'train' else None)
  buckets = sorted(ds.plan.buckets.items(), key=lambda kv: dataclasses.astuple(kv[0]))
  check_batch_axes(cfg, num_devices, jax.process_count(), sorted({k.kind for k, _ in buckets}))
  shown = '; '.join(f'{k.kind} {k.height}x{k.width}x{k.depth} x {k.images} image(s), text '
                    f'{k.length}: {len(v)} samples' for k, v in buckets)
  counts = ', '.join(f'{name} {n}' for name, n in sorted(splits.items()))
  cached = '' if image_cache is None else f'; image tokens from {image_cache.directory}'
  mix = f'; {ds.plan.describe()}' if split == 'train' else ''
  it = iter(ds)
  it.stats = ds.stats          # the loop reports the datasets' shares of the drawn samples
  it.targets = ds.plan.targets
  return it, (f'{manifest}: samples {counts}; the {split} split in {len(buckets)} shape '
              f'bucket(s): {shown}{cached}{mix}')


def _bucket(batch: dict) -> str:
  """'images 8x1x3x64x64x4, text 48' (or 'image_tokens 8x32x64, ...' from the image-token
  cache): the shapes one compiled step serves."""
  key = 'image_tokens' if 'image_tokens' in batch else 'images'
  return (f'{key} {"x".join(map(str, batch[key].shape))}, '
          f'text {batch["tokens"].shape[1]}')


def check_batch_rows(cfg: Config, mesh, rules) -> None:
  """`check_batch_processes` on the batch sharding of `mesh`: a ConfigError naming mesh.ici /
  mesh.dcn, before the first step, when two processes would hold the same rows of a global batch
  that `global_batch` assembles from each process's own rows."""
  sharding = batch_lib.batch_sharding(mesh, rules)
  rows = batch_lib.batch_shards(mesh, rules)       # one row per shard: every split is seen
  index_map = sharding.devices_indices_map((rows,))
  check_batch_processes(index_map, {d: d.process_index for d in index_map}, cfg.mesh, rows)


def global_batch(batch: dict, mesh, rules) -> dict:
  """This host's rows -> global arrays, the batch axis sharded by the `act_batch` rule (stored
  voxels, data.host_dtype='stored', become the model's float32 images there)."""
  sh = batch_lib.batch_sharding(mesh, rules)
  out = {}
  for k in batch_lib.host_keys(batch):
    x = np.asarray(batch[k])
    out[k] = jax.make_array_from_process_local_data(sh, x)
  return batch_lib.device_inputs(out)


class _StopFlag:
  """Set by SIGTERM / SIGINT, or by `fail` (this host's data); the loop saves and stops at the
  next step boundary. Every host stops at the same step: `is_set` agrees over all of them."""

  SIGNAL, FAILED = 1, 2     # `code`: why the run stops (the highest any host has)

  def __init__(self, say=None):
    self.signal = None
    self.failure: str | None = None     # this host's reason to stop with an error
    self.code = 0
    self._old = {}
    self._say = say

  def install(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:      # not the main thread
        pass

  def _handle(self, signum, _frame):
    if self.signal == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt       # a second Ctrl-C: stop now, without the checkpoint
    if self.signal is None and self._say is not None:
      self._say(f'{signal.Signals(signum).name}: saving a checkpoint after this step'
                + (' (Ctrl-C again: stop without it)' if signum == signal.SIGINT else ''))
    self.signal = signum

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def fail(self, message: str):
    if self.failure is None:
      self.failure = message

  def is_set(self) -> bool:
    local = (self.FAILED if self.failure is not None
             else self.SIGNAL if self.signal is not None else 0)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      local = int(np.max(multihost_utils.process_allgather(np.array([local]))))
    self.code = local
    return local > 0


def _finite(x) -> bool:
  return bool(np.isfinite(np.asarray(x)))


_BUILT: dict = {}


# Where the data lives (folder and file names): the model, optimizer and steps never read them, so
# the same run over another copy of the data (a sharded store, a URL) reuses the compiled steps.
_DATA_LOCATION = ('store', 'manifest', 'tokenizer')


def _cache_key(cfg: Config, mesh) -> tuple:
  fields = cfg.to_dict()
  fields['data'] = {k: v for k, v in fields['data'].items() if k not in _DATA_LOCATION}
  return (json.dumps(fields, sort_keys=True, default=str), tuple(mesh.shape.items()),
          tuple(d.id for d in mesh.devices.flat))


def build(cfg: Config, mesh=None):
  """(mesh, rules, graphdef, tx, abstract TrainState, shardings) for a config (cached per
  config and devices in this process: tracing the abstract model takes seconds)."""
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  key = _cache_key(cfg, mesh)
  if key not in _BUILT:
    _BUILT.clear()
    _BUILT[key] = _build(cfg, mesh)
  return _BUILT[key]


def _build(cfg: Config, mesh):
  rules = sharding.rules_for(cfg.mesh)
  graphdef, abs_params = lora.abstract_model(cfg.model, cfg.finetune, mesh, rules)
  optim.check_patterns(cfg.train, abs_params)
  abs_trainable, _ = optim.split_trainable(abs_params, optim.trainable_spec(cfg))
  optim.check_trainable(cfg, abs_trainable)
  tx = optim.make_optimizer(cfg.train, abs_trainable)
  abs_state = step_lib.abstract_train_state((graphdef, abs_params), tx, mesh, rules,
                                            optim.trainable_spec(cfg))
  shardings = jax.tree.map(lambda a: a.sharding, abs_state)
  return mesh, rules, graphdef, tx, abs_state, shardings


def init_params(model_cfg, seed: int = 0, mesh=None, rules=None, param_shardings=None):
  """Random parameters (deterministic in `seed`) created inside one jit, directly in their
  shardings: no eager per-parameter dispatch, and a 13B model is never materialised on one device
  or on the host. (Values differ from the eager `create_model(seed=...)`.)"""
  def make():
    return nnx.split(RadFM(model_cfg, rngs=nnx.Rngs(seed)))[1]
  if mesh is None:
    with nnx.use_eager_sharding(False):
      return jax.jit(make)()
  with sharding.use_mesh(mesh, rules):
    return jax.jit(make, out_shardings=param_shardings)()


def base_params(cfg: Config, mesh, rules):
  """The parameters of `finetune.init_from` (any checkpoint `checkpoint.load` reads), sharded, in
  `model.param_dtype`; ConfigError when its architecture differs from `cfg.model`'s."""
  from radfm_jax.checkpoint import load
  try:
    model, base_cfg = load(cfg.finetune.init_from, mesh=mesh, rules=rules)
  except InputError as e:           # names the folder, not the field that named it
    raise InputError(f'config field finetune.init_from: {e}') from e
  for part in ('vision', 'perceiver', 'llama'):
    if getattr(base_cfg, part) != getattr(cfg.model, part):
      raise ConfigError(f'config field finetune.init_from={cfg.finetune.init_from!r}: its '
                        f'model.{part} is {getattr(base_cfg, part)}, expected the run\'s '
                        f'{getattr(cfg.model, part)}')
  dtype = np.dtype(cfg.model.param_dtype)
  return jax.tree.map(lambda x: x.astype(dtype), nnx.state(model))


_INIT: dict = {}


def init_state(cfg: Config, mesh, rules, tx, shardings):
  """A fresh TrainState (parameters: random from cfg.seed, or `finetune.init_from`'s, with the
  run's adapters; zero optimizer state), sharded."""
  key = _cache_key(cfg, mesh)
  if key not in _INIT:
    def make(base):
      params = nnx.split(lora.build(cfg.model, cfg.finetune, cfg.seed, base))[1]
      return step_lib.init_train_state(params, tx, optim.trainable_spec(cfg))
    _INIT.clear()
    _INIT[key] = jax.jit(make, out_shardings=shardings)
  base = base_params(cfg, mesh, rules) if cfg.finetune.init_from else None
  with sharding.use_mesh(mesh, rules):
    return _INIT[key](base)


_JITTED: dict = {}
_COMPILED: set = set()        # (step kind, batch shapes) compiled by the cached jitted steps


def _jitted_steps(cfg: Config, mesh, rules, graphdef, tx, shardings):
  """The jitted (train, eval) steps, reused by later `train` calls in this process with the same
  config and devices (a resumed run in the same process does not compile again, nor the same run
  over another copy of its data: `_cache_key` leaves out where the data lives)."""
  key = _cache_key(cfg, mesh)
  if key not in _JITTED:
    train_step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, cfg), shardings,
                                         mesh, rules, cfg.mesh.xla_options)
    eval_step = None
    if cfg.train.eval_every:
      eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(graphdef, cfg),
                                         shardings.params, mesh, rules, cfg.mesh.xla_options)
    _JITTED.clear()           # keep one entry: compiled executables hold device memory
    _COMPILED.clear()
    _JITTED[key] = (train_step, eval_step)
  return _JITTED[key]


def evaluate(eval_step, params, data, mesh, rules, num_batches: int) -> dict:
  """Token-weighted mean of the eval metrics over `num_batches` batches (fewer if data ends)."""
  sums, tokens, seqs = {}, 0.0, 0
  for _ in range(num_batches):
    try:
      batch = next(data)
    except StopIteration:
      break
    m = jax.device_get(eval_step(params, global_batch(batch, mesh, rules)))
    n = float(m['tokens'])
    for k in ('loss', 'token_accuracy'):
      sums[k] = sums.get(k, 0.0) + float(m[k]) * n
    sums['sequence_accuracy'] = sums.get('sequence_accuracy', 0.0) + float(m['sequence_accuracy'])
    tokens += n
    seqs += 1
  if not seqs:
    return {}
  return {'loss': sums['loss'] / max(tokens, 1.0),
          'token_accuracy': sums['token_accuracy'] / max(tokens, 1.0),
          'sequence_accuracy': sums['sequence_accuracy'] / seqs, 'tokens': tokens}


def mixture_metrics(counts: dict, previous: dict) -> dict:
  """The training metrics of the data mixture from {dataset: samples drawn so far in this call}
  (`PipelineStats.datasets` after a step) and the same at the previous logged row:
  `share/<dataset>` (the dataset's fraction of every sample drawn in this call) and
  `drawn/<dataset>` (samples drawn since the previous logged row: summed over the rows of
  metrics.jsonl they count a resumed run's samples too)."""
  total = sum(counts.values())
  out = {}
  for d in sorted(counts):
    out[f'share/{d}'] = counts[d] / total if total else 0.0
    out[f'drawn/{d}'] = counts[d] - previous.get(d, 0)
  return out


def run_dirs(workdir: str) -> tuple[str, str]:
  """(checkpoint root, local log dir). A URL workdir (gs://...) keeps the checkpoints there (Orbax
  writes to GCS; its config.json and tokenizer.model too) and the JSONL / TensorBoard logs and
  loss_curve.png in $RADFM_LOGDIR/<run name> (default /tmp/radfm_logs), since appending to
  objects in GCS is not possible."""
  if '://' in workdir:
    name = workdir.rstrip('/').rsplit('/', 1)[-1]
    return workdir, os.path.join(os.environ.get('RADFM_LOGDIR', '/tmp/radfm_logs'), name)
  workdir = os.path.abspath(workdir)
  return workdir, workdir


class _Say:
  """Prints `radfm-jax train: ...` lines to stderr on process 0, above the progress bar."""

  def __init__(self, enabled: bool):
    self.enabled, self.bar = enabled, None

  def __call__(self, msg: str):
    if not self.enabled:
      return
    line = f'radfm-jax train: {msg}'
    if self.bar is not None:
      self.bar.write(line, file=sys.stderr)
    else:
      print(line, file=sys.stderr, flush=True)


class _SkipLog:
  """The samples the pipeline dropped to an empty row because a scan could not be read
  (`data.drop_unreadable=True`; False stops the run instead): every one is appended to
  LOGDIR/skipped.jsonl (`skipped.process_<i>.jsonl` on host i > 0) as it happens and the first
  `SAY` are said, so none is lost without a word; `count` goes to metrics.jsonl."""

  SAY = 10
  STOP_FROM = 10      # data.max_unreadable_share is enforced from this many skipped samples

  def __init__(self, logdir: str, process: int, say: _Say):
    name = 'skipped.jsonl' if process == 0 else f'skipped.process_{process}.jsonl'
    self.path, self.say, self.entries = os.path.join(logdir, name), say, []
    cut = metrics_lib.cut_torn_line(self.path)
    if cut:
      say(f'{self.path}: cut off a torn last line ({cut} bytes: a write cut short by a kill or a '
          'full disk)')

  @property
  def count(self) -> int:
    return len(self.entries)

  def update(self, skipped: list[dict]):
    """Records the entries of the pipeline's `PipelineStats.skipped` not seen yet."""
    new = skipped[len(self.entries):]
    if not new:
      return
    metrics_lib.append_lines(self.path, [json.dumps(e) + '\n' for e in new])
    for e in new:
      self.entries.append(e)
      if len(self.entries) <= self.SAY:
        self.say(f'skipped sample {e.get("sample_id")!r}: scan {e.get("scan_id")!r} could not be '
                 f'read ({e.get("reason")}); its row is left empty (data.drop_unreadable; '
                 f'listed in {self.path})')

  def over_share(self, readable: int, share: float) -> str | None:
    """Why the run must stop when more than `share` of the samples drawn so far (`readable` +
    skipped) were skipped, from the STOP_FROM-th skipped on; None otherwise."""
    drawn = readable + self.count
    if self.count < self.STOP_FROM or self.count <= share * drawn:
      return None
    first = self.entries[0]
    return (f'{self.count} of the {drawn} samples drawn were unreadable ({self.count / drawn:.0%}, '
            f'more than data.max_unreadable_share={share:g}), listed in {self.path}; the first: '
            f'scan {first.get("scan_id")!r} ({first.get("reason")}); expected a store that gives '
            'the scans its manifest names (re-run `radfm-jax ingest` to restore lost arrays, or '
            'check data.store / data.manifest)')


@contextlib.contextmanager
def _quiet_orbax(errors: bool = False):
  """A resume restores every item with explicit args, yet Orbax logs (absl, WARNING) 'Item "state"
  was found in the checkpoint, but could not be restored' twice per item: it reads like failure,
  so WARNINGs are hidden for the call. Errors still show, unless `errors` (the training loop: a
  background save that fails logs its traceback from each of Orbax's threads, and then raises it
  at the next save or wait, where it is reported)."""
  import logging

  from absl import logging as absl_logging
  old_absl, logger = absl_logging.get_verbosity(), logging.getLogger('absl')
  old_level = logger.level
  absl_logging.set_verbosity(absl_logging.FATAL if errors else absl_logging.ERROR)
  logger.setLevel(logging.CRITICAL if errors else logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(old_absl)
    logger.setLevel(old_level)


def _summary(say, cfg: Config, mesh, abs_state, data_text: str, tokenizer: str | None,
             workdir: str, logdir: str, step: int, total: int):
  from radfm_jax.models.radfm import count_params
  n = count_params(abs_state.params)
  trainable = count_params(optim.split_trainable(abs_state.params, optim.trainable_spec(cfg))[0])
  ft, m = cfg.finetune, cfg.model
  adapters = ('' if ft.method == 'full' else f': {lora.adapter_count(abs_state.params):,} in '
              f'{ft.method} adapters of rank {ft.rank}')
  say(f'model {m.size}: {n / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable{adapters}), '
      f'{m.param_dtype} parameters, {m.compute_dtype} compute')
  devices = mesh.devices.flat[0]
  shape = ' '.join(f'{k}={v}' for k, v in mesh.shape.items())
  say(f'{mesh.devices.size} {devices.platform} device(s) ({devices.device_kind}) over '
      f'{jax.process_count()} process(es); mesh {shape}, rules {cfg.mesh.rules}')
  if devices.platform == 'cpu':
    say(hostmem.describe(cfg.mesh.host_allocator))
  say(f'data: {data_text}')
  if tokenizer:
    say(f'tokenizer: {cfg.data.tokenizer} (kept in the run as {tokenizer})')
  cache = compile_cache.directory()
  say(f'workdir {workdir}: checkpoints/, metrics.jsonl'
      + (f', tensorboard/ (view: tensorboard --logdir {logdir}/tensorboard)'
         if cfg.train.tensorboard else '') + ', loss_curve.png'
      + (f' (logs in {logdir})' if logdir != workdir else '')
      + f'; compilation cache: {cache or "off"}')
  say(f'steps {step} -> {total} of train.steps={cfg.train.steps} (warmup {cfg.train.warmup}, '
      f'learning rate {cfg.train.learning_rate:g}), a checkpoint every '
      f'{cfg.train.checkpoint_every or "(end only)"} steps')


def plot_loss_curve(logdir: str, title: str) -> str | None:
  """LOGDIR/loss_curve.png from the train rows of LOGDIR/metrics.jsonl (every call of a resumed
  run; the latest row of a step wins); None when there is nothing to plot."""
  losses = {r['step']: r['loss'] for r in metrics_lib.read_metrics(logdir, 'train')}
  if not losses:
    return None
  path = os.path.join(logdir, 'loss_curve.png')
  metrics_lib.plot_losses(losses, path, title)
  return path


def last_step(t, max_steps: int | None) -> tuple[int, str | None]:
  """(the step a run stops at: `train.steps`, or `max_steps` when smaller; a line to say when
  `max_steps` is past `train.steps`, else None: it is not raised in silence)."""
  if max_steps is None or max_steps <= t.steps:
    return (t.steps if max_steps is None else max_steps), None
  return t.steps, (f'max steps {max_steps} (--max-steps): past train.steps={t.steps}, where the '
                   f'learning-rate schedule ends; the run stops at step {t.steps} (raise '
                   'train.steps to train longer)')


def train(cfg: Config, workdir: str, *, data=None, eval_data=None, max_steps: int | None = None,
          mesh=None, progress: bool = True, on_step=None, verbose: bool = True,
          fallback: bool = True) -> TrainResult:
  """Trains (or resumes) until `train.steps` (or `max_steps` optimizer steps in total).

  progress: the tqdm bar (shown only on a terminal); verbose: the start-up summary, compile and
  resume lines (stderr, process 0); fallback: a latest checkpoint that does not restore is
  reported and the newest intact one used (`Checkpointer.restore_latest`), else an InputError.
  One run per workdir: another run in it is a `rundir.WorkdirLocked` error."""
  with contextlib.ExitStack() as held:      # the workdir's lock, taken once the config is checked
    return _train(cfg, workdir, held, data=data, eval_data=eval_data, max_steps=max_steps,
                  mesh=mesh, progress=progress, on_step=on_step, verbose=verbose,
                  fallback=fallback)


def _train(cfg: Config, workdir: str, held: contextlib.ExitStack, *, data, eval_data, max_steps,
           mesh, progress, on_step, verbose, fallback) -> TrainResult:
  t = cfg.train
  given_workdir = workdir
  workdir, logdir = run_dirs(workdir)
  is_main = jax.process_index() == 0
  say = _Say(is_main and verbose)
  from_store = data is None and cfg.data.store not in ('', SYNTHETIC_STORE)
  if data is not None:
    data_text = f'{type(data).__name__} given by the caller'
  elif cfg.data.image_cache:
    check_data_store(cfg)             # the data opens once the vision tower's weights are known
  else:
    # an empty data.store, or a batch that does not split over the mesh: a ConfigError here,
    # before the model is built
    data, data_text = open_data(cfg, 'train', mesh.devices.size if mesh is not None else None,
                                periodic_eval=eval_data is None)
  ckpt_dir = workdir.rstrip('/') + '/checkpoints'
  held.enter_context(rundir.lock_workdir(ckpt_dir, given_workdir, is_main))   # before any write
  if is_main:
    for path, what in rundir.remove_unfinished(ckpt_dir):
      say(f'removed {path}: {what}')
  # What the run reads beyond its config (its train split, its tokenizer): a resume on other
  # data or another tokenizer is refused (the same check as the config's), before any copy.
  inputs = rundir.run_inputs(cfg) if from_store else {}
  # before Orbax reads a shape (data.tokenizer may change: the copy is compared by its bytes)
  rundir.check_same_run(rundir.record(cfg, None, inputs), ckpt_dir, given_workdir)
  keeps_tokenizer = is_main and cfg.data.store not in ('', SYNTHETIC_STORE)
  tokenizer = rundir.keep_tokenizer(cfg, workdir, write=False) if keeps_tokenizer else None
  config_dict = rundir.record(cfg, tokenizer, inputs)
  saved = rundir.saved_config(ckpt_dir) if is_main and rundir.has_checkpoints(ckpt_dir) else None
  for field, old, new in rundir.resumable_changes(saved or {}, config_dict):
    say(f'resume changes {field}: {old!r} -> {new!r}' + (
        ' (recorded, not read: a resume starts from its own steps, only a fresh run from '
        'finetune.init_from)' if field == 'finetune.init_from' else ''))
  mesh, rules, graphdef, tx, abs_state, shardings = build(cfg, mesh)
  check_batch_rows(cfg, mesh, rules)    # processes' own rows must not be taken for one batch
  ckpt = Checkpointer(ckpt_dir, max_to_keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  total, notice = last_step(t, max_steps)
  if notice:
    say(notice)
  image_cache = None
  if cfg.data.image_cache:
    # The cache belongs to the frozen vision tower's weights: restore (or initialise) the state
    # first, then open the cache of its tower, then the data over it, then the data's position.
    from radfm_jax.train.image_cache import open_for_run
    with _quiet_orbax():
      restored = ckpt.restore_latest(abs_state, None, fallback=fallback,
                                     log=say if say.enabled else None)
    latest = restored[0] if restored is not None else None
    state = restored[1] if restored is not None else init_state(cfg, mesh, rules, tx, shardings)
    source = f'run {workdir} ' + (f'step {latest}' if latest is not None else
                                  f'initialised from seed {cfg.seed}')
    image_cache = open_for_run(cfg, state.params, source)
    if data is None:
      data, data_text = open_data(cfg, 'train', mesh.devices.size, image_cache=image_cache,
                                  periodic_eval=eval_data is None)
    _summary(say, cfg, mesh, abs_state, data_text, tokenizer, workdir, logdir, latest or 0,
             total)
    if latest is not None:
      with _quiet_orbax():
        ckpt.restore_data(latest, data)
  else:
    _summary(say, cfg, mesh, abs_state, data_text, tokenizer, workdir, logdir,
             ckpt.latest_step() or 0, total)
    with _quiet_orbax():
      restored = ckpt.restore_latest(abs_state, data, fallback=fallback,
                                     log=say if say.enabled else None)   # newest intact step
    latest = restored[0] if restored is not None else None
    state = restored[1] if restored is not None else init_state(cfg, mesh, rules, tx, shardings)
  if restored is not None:
    say(f'resumed from step {latest} (' + ('data position restored)' if hasattr(
        data, 'get_state') else 'data position not restored: the iterator has no get_state)'))
  if is_main:
    # Only now, the state restored or initialised: a run that failed before (a config the model
    # refuses, no step that restores) leaves the workdir's tokenizer and record as they were.
    if keeps_tokenizer:
      rundir.keep_tokenizer(cfg, workdir)
    rundir.write_record(ckpt.directory, config_dict)
  writer = metrics_lib.MetricWriter(logdir, tensorboard=t.tensorboard, enabled=is_main)
  if writer.cut:
    say(f'{writer.path}: cut off a torn last line ({writer.cut} bytes: a write cut short by a '
        'kill or a full disk)')
  train_step, eval_step = _jitted_steps(cfg, mesh, rules, graphdef, tx, shardings)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0], t.peak_tflops)
  num_devices = mesh.devices.size

  step = int(jax.device_get(state.step))
  if step > total:
    say(f'the run is at step {step}, past the {total} steps asked for (--max-steps): nothing to '
        'train')
  losses, last_saved = {}, latest
  stop = _StopFlag(say)
  stop.install()
  bar = None
  if is_main:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, desc='train', unit='step', dynamic_ncols=True,
               file=sys.stderr, disable=None if progress else True)   # None: only on a TTY
    say.bar = bar

  pending = None      # (step number, metrics on device, tokens, flops, samples per dataset)
  last_time = time.perf_counter()

  def run_step(kind: str, fn, *args):
    """fn(*args), announcing the compile of a new batch shape and keeping its time out of the
    step rates (jit compiles synchronously in the call; the run itself is dispatched async)."""
    nonlocal last_time
    batch = args[-1]
    key = (kind, tuple((k, batch[k].shape) for k in sorted(batch)))
    if key in _COMPILED:
      return fn(*args)
    say(f'compiling {kind} step for bucket {_bucket(batch)} ...')
    hits = compile_cache.counts()['hits']
    start = time.perf_counter()
    out = fn(*args)
    spent = time.perf_counter() - start
    _COMPILED.add(key)
    loaded = compile_cache.counts()['hits'] > hits
    say(f'{kind} step for bucket {_bucket(batch)} '
        f'{"loaded from the compilation cache" if loaded else "compiled"} in {spent:.1f} s')
    last_time += spent
    if bar is not None:
      bar.unpause()             # the bar's rate and ETA restart after the compile
    return out

  stats = getattr(data, 'stats', None)        # the Grain pipeline's PipelineStats
  logged_counts: dict = {}                    # samples per dataset drawn at the last logged row
  skip_log = _SkipLog(logdir, jax.process_index(), say)

  def handle(p):
    nonlocal last_time, logged_counts
    number, m, tokens, flops, counts = p
    m = jax.device_get(m)
    now = time.perf_counter()
    dt, last_time = now - last_time, now
    if not _finite(m['loss']) or float(m.get('params_finite', 1.0)) < 1:
      ckpt.wait()
      raise NonFiniteLossError(
          f'non-finite loss {float(m["loss"])} or parameters at step {number} (grad_norm '
          f'{float(m["grad_norm"])}); stopping. Last good checkpoint: '
          f'{"step " + str(last_saved) if last_saved is not None else "none"} in '
          f'{ckpt.directory}. Lower train.learning_rate or check the data.')
    losses[number] = float(m['loss'])
    values = {k: float(v) for k, v in m.items()}
    values['tokens_per_s'] = tokens / dt
    values['step_time_s'] = dt
    if peak:
      values['mfu'] = flops / dt / (peak * num_devices)
    if on_step is not None:
      on_step(number, values)
    if bar is not None:
      post = {'loss': f'{values["loss"]:.4f}', 'tok/s': f'{values["tokens_per_s"]:.0f}'}
      if 'mfu' in values:
        post['mfu'] = f'{values["mfu"]:.1%}'
      bar.set_postfix(post, refresh=False)
      bar.update(1)
    if number % t.log_every == 0 or number == total:
      if counts is not None:
        values.update(mixture_metrics(counts, logged_counts))
        logged_counts = counts
      if stats is not None:
        # this host's, since this call started; the pipeline reads ahead of the step
        values['skipped_samples'] = skip_log.count
      writer.write(number, 'train', values)

  def save(number):
    nonlocal last_saved
    if last_saved == number:
      return
    ckpt.save(number, state, data, config_dict)
    last_saved = number

  status = 'done'
  held.enter_context(_quiet_orbax(errors=True))
  try:
    while step < total:
      if stop.is_set():
        status = ('failed' if stop.code == stop.FAILED
                  else 'interrupted' if stop.signal == signal.SIGINT else 'preempted')
        break
      try:
        host_batch = next(data)
      except StopIteration:
        break
      if stats is not None:
        skip_log.update(stats.skipped)
        failure = skip_log.over_share(sum(stats.datasets.values()), cfg.data.max_unreadable_share)
        if failure is not None:
          stop.fail(failure)     # this batch still trains; every host stops before the next
      batch = global_batch(host_batch, mesh, rules)
      tokens = float(np.prod(batch['tokens'].shape))
      flops = metrics_lib.batch_flops(cfg.model, batch)
      state, m = run_step('train', train_step, state, batch)
      step += 1
      if pending is not None:
        handle(pending)
      pending = (step, m, tokens, flops, None if stats is None else dict(stats.datasets))
      if t.checkpoint_every and step % t.checkpoint_every == 0:
        handle(pending)
        pending = None
        save(step)
      if eval_step is not None and step % t.eval_every == 0:
        if pending is not None:
          handle(pending)
          pending = None
        try:
          eval_iter = eval_data if eval_data is not None else make_data(cfg, 'eval',
                                                                        image_cache)
        except ValueError as e:      # e.g. the manifest has no 'eval' split
          say(f'periodic eval disabled: {e}')
          eval_step = None
          eval_iter = None
        if eval_iter is not None:
          result = evaluate(lambda p, b: run_step('eval', eval_step, p, b), state.params,
                            eval_iter, mesh, rules, t.eval_steps)
          if result:
            writer.write(step, 'eval', result)
        last_time = time.perf_counter()
    if pending is not None:
      handle(pending)
      pending = None
    save(step)
    ckpt.wait()
  finally:
    stop.restore()
    if bar is not None:
      bar.close()
      say.bar = None
    writer.close()
    ckpt.close()
  if stats is not None and sum(stats.datasets.values()):
    shares = stats.shares()
    targets = getattr(data, 'targets', {})
    say('samples drawn per dataset (this call): ' + ', '.join(
        f'{d} {stats.datasets[d]} ({shares[d]:.1%}' + (f', target {targets[d]:.1%})' if d in targets
                                                      else ')') for d in shares))
  if skip_log.count:
    one = skip_log.count == 1
    say(f'{skip_log.count} sample{"" if one else "s"} skipped for an unreadable scan '
        f'({"its row" if one else "their rows"} left empty), listed in {skip_log.path}')
  if status == 'failed':
    reason = stop.failure or ('another host stopped: more of its samples were unreadable than '
                              f'data.max_unreadable_share={cfg.data.max_unreadable_share:g} '
                              'allows (see its skipped.process_N.jsonl)')
    raise UnreadableDataError(f'stopped at step {step} (checkpoint saved in {ckpt.directory}): '
                              f'{reason}')
  if status != 'done':
    say(f'signal {signal.Signals(stop.signal).name if stop.signal else "(another host)"} '
        f'received; checkpoint saved at step {step} in {ckpt.directory}')
  if is_main:
    try:
      path = plot_loss_curve(logdir, f'radfm-jax train: {cfg.model.size}, step {step}')
      if path:
        say(f'loss curve: {path}')
    except ImportError as e:
      say(f'no loss_curve.png ({e}); pip install matplotlib')
  return TrainResult(step=step, losses=losses, status=status, last_checkpoint=last_saved,
                     state=state, skipped=list(skip_log.entries))


__all__ = ['NonFiniteLossError', 'TrainResult', 'UnreadableDataError', 'base_params', 'build',
           'check_batch_rows', 'evaluate', 'global_batch', 'init_params', 'init_state', 'last_step',
           'make_data', 'mixture_metrics', 'open_data', 'plot_loss_curve', 'run_dirs', 'train']
