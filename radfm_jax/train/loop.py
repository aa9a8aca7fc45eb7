"""The training loop: `radfm-jax train --config configs/radfm.py:model=tiny,mesh=cpu --workdir DIR`.

    result = train(cfg, workdir)      # Python: same thing; `data=` takes any iterator of batch dicts

Per step: this host's batch (numpy) -> global arrays (`jax.make_array_from_process_local_data`)
-> the jitted, donated train step. Metrics are read one step late (the host never waits for the
step it just dispatched) except before a checkpoint, where the step's loss is checked first.
Outputs in `workdir`: checkpoints/ (async Orbax: state, data-iterator state, config), config.json,
metrics.jsonl, tensorboard/ (event files). A run restarts from the latest checkpoint in `workdir`.
A gs:// workdir holds the checkpoints; the logs then go to $RADFM_LOGDIR/<run name> (`run_dirs`).

Stops: `train.steps` reached (or `max_steps`), SIGTERM / SIGINT (saves a checkpoint at the current
step, then returns normally: exit code 0), a non-finite loss (`NonFiniteLossError`: nothing is
saved after the last good checkpoint, which stays intact).

Data: `cfg.data.store == ''` -> `SyntheticBatches` (deterministic random batches from the config
shapes); otherwise the Grain pipeline `radfm_jax.data.pipeline.make_dataset` over
`cfg.data.store` with the tokenizer `cfg.data.tokenizer`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx

from radfm_jax import sharding
from radfm_jax.checkpoint import Checkpointer
from radfm_jax.config import Config
from radfm_jax.data import batch as batch_lib
from radfm_jax.models.radfm import RadFM, abstract_model
from radfm_jax.train import metrics as metrics_lib
from radfm_jax.train import optim
from radfm_jax.train import step as step_lib
from radfm_jax.train.synthetic import SyntheticBatches


class NonFiniteLossError(RuntimeError):
  """The loss became NaN / inf; the run stopped without saving the bad state."""


@dataclasses.dataclass
class TrainResult:
  step: int                          # optimizer steps done (state.step) when the run returned
  losses: dict                       # {step: train loss} of the steps run in this call
  status: str                        # 'done' | 'preempted'
  last_checkpoint: int | None
  state: object = None               # the final TrainState (device arrays)


def make_data(cfg: Config, split: str = 'train', image_cache=None):
  """This host's iterator of batch dicts for `split` ('train' or 'eval'); `image_cache` (an
  ImageTokenCache, with data.image_cache): batches of cached image tokens."""
  if not cfg.data.store:
    seed = cfg.seed if split == 'train' else cfg.seed + 7919
    return SyntheticBatches(cfg, seed=seed, process_index=jax.process_index(),
                            process_count=jax.process_count())
  from radfm_jax.data.pipeline import make_dataset
  from radfm_jax.data.tokenizer import Tokenizer
  tokenizer = Tokenizer(cfg.data.tokenizer, max_images=cfg.model.max_images,
                        num_latents=cfg.model.perceiver.num_latents)
  ds = make_dataset(cfg.data, cfg.model, cfg.data.store, tokenizer, seed=cfg.seed,
                    split=split, num_epochs=None if split == 'train' else 1,
                    image_cache=image_cache)
  return iter(ds)


def global_batch(batch: dict, mesh, rules) -> dict:
  """This host's rows -> global arrays, the batch axis sharded by the `act_batch` rule."""
  sh = batch_lib.batch_sharding(mesh, rules)
  out = {}
  for k in batch_lib.keys('image_tokens' in batch):
    x = np.asarray(batch[k])
    out[k] = jax.make_array_from_process_local_data(sh, x)
  return out


class _StopFlag:
  """Set by SIGTERM / SIGINT; the loop saves and returns at the next step boundary."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def install(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:      # not the main thread
        pass

  def _handle(self, signum, _frame):
    self.signal = signum

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def is_set(self) -> bool:
    local = self.signal is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return bool(np.any(multihost_utils.process_allgather(np.array([local]))))
    return local


def _finite(x) -> bool:
  return bool(np.isfinite(np.asarray(x)))


_BUILT: dict = {}


def _cache_key(cfg: Config, mesh) -> tuple:
  return (json.dumps(cfg.to_dict(), sort_keys=True, default=str), tuple(mesh.shape.items()),
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
  graphdef, abs_params = abstract_model(cfg.model, mesh, rules)
  abs_trainable, _ = optim.split_trainable(abs_params, cfg.train.freeze)
  tx = optim.make_optimizer(cfg.train, abs_trainable)
  abs_state = step_lib.abstract_train_state((graphdef, abs_params), tx, mesh, rules,
                                            cfg.train.freeze)
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


_INIT: dict = {}


def init_state(cfg: Config, mesh, rules, tx, shardings):
  """A fresh TrainState (random parameters from cfg.seed, zero optimizer state), sharded."""
  key = _cache_key(cfg, mesh)
  if key not in _INIT:
    def make():
      params = nnx.split(RadFM(cfg.model, rngs=nnx.Rngs(cfg.seed)))[1]
      return step_lib.init_train_state(params, tx, cfg.train.freeze)
    _INIT.clear()
    _INIT[key] = jax.jit(make, out_shardings=shardings)
  with sharding.use_mesh(mesh, rules):
    return _INIT[key]()


_JITTED: dict = {}


def _jitted_steps(cfg: Config, mesh, rules, graphdef, tx, shardings):
  """The jitted (train, eval) steps, reused by later `train` calls in this process with the same
  config and devices (a resumed run in the same process does not compile again)."""
  key = _cache_key(cfg, mesh)
  if key not in _JITTED:
    train_step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, cfg), shardings,
                                         mesh, rules)
    eval_step = None
    if cfg.train.eval_every:
      eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(graphdef, cfg),
                                         shardings.params, mesh, rules)
    _JITTED.clear()           # keep one entry: compiled executables hold device memory
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


def run_dirs(workdir: str) -> tuple[str, str]:
  """(checkpoint root, local log dir). A URL workdir (gs://...) keeps the checkpoints there (Orbax
  writes to GCS) and the JSONL / TensorBoard / config.json logs in $RADFM_LOGDIR/<run name>
  (default /tmp/radfm_logs), since appending to objects in GCS is not possible."""
  if '://' in workdir:
    name = workdir.rstrip('/').rsplit('/', 1)[-1]
    return workdir, os.path.join(os.environ.get('RADFM_LOGDIR', '/tmp/radfm_logs'), name)
  workdir = os.path.abspath(workdir)
  return workdir, workdir


def train(cfg: Config, workdir: str, *, data=None, eval_data=None, max_steps: int | None = None,
          mesh=None, progress: bool = True, on_step=None) -> TrainResult:
  """Trains (or resumes) until `train.steps` (or `max_steps` optimizer steps in total)."""
  t = cfg.train
  workdir, logdir = run_dirs(workdir)
  is_main = jax.process_index() == 0
  mesh, rules, graphdef, tx, abs_state, shardings = build(cfg, mesh)
  ckpt = Checkpointer(workdir.rstrip('/') + '/checkpoints', max_to_keep=t.keep_checkpoints,
                      async_save=t.async_checkpoint)
  config_dict = cfg.to_dict()
  latest = ckpt.latest_step()
  image_cache = None
  if cfg.data.image_cache:
    # The cache belongs to the frozen vision tower's weights: know them before opening the data.
    from radfm_jax.train.image_cache import open_for_run
    if latest is not None:
      state, _ = ckpt.restore(latest, abs_state)
    else:
      state = init_state(cfg, mesh, rules, tx, shardings)
    source = f'run {workdir} ' + (f'step {latest}' if latest is not None else
                                  f'initialised from seed {cfg.seed}')
    image_cache = open_for_run(cfg, state.params, source)
    data = data if data is not None else make_data(cfg, 'train', image_cache)
    if latest is not None:
      ckpt.restore_data(latest, data)
  else:
    data = data if data is not None else make_data(cfg, 'train')
    if latest is not None:
      state, _ = ckpt.restore(latest, abs_state, data)
    else:
      state = init_state(cfg, mesh, rules, tx, shardings)
  if is_main:
    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, 'config.json'), 'w') as f:
      json.dump(config_dict, f, indent=1, default=str)
  writer = metrics_lib.MetricWriter(logdir, tensorboard=t.tensorboard, enabled=is_main)
  train_step, eval_step = _jitted_steps(cfg, mesh, rules, graphdef, tx, shardings)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0], t.peak_tflops)
  num_devices = mesh.devices.size

  step = int(jax.device_get(state.step))
  total = t.steps if max_steps is None else min(t.steps, max_steps)
  losses, last_saved = {}, latest
  stop = _StopFlag()
  stop.install()
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, desc='train', dynamic_ncols=True, file=sys.stderr)

  pending = None              # (step number, metrics on device, tokens, flops, dispatch time)
  last_time = time.perf_counter()

  def handle(p):
    nonlocal last_time
    number, m, tokens, flops = p
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
      writer.write(number, 'train', values)

  def save(number):
    nonlocal last_saved
    if last_saved == number:
      return
    ckpt.save(number, state, data, config_dict)
    last_saved = number

  status = 'done'
  try:
    while step < total:
      if stop.is_set():
        status = 'preempted'
        break
      try:
        host_batch = next(data)
      except StopIteration:
        break
      batch = global_batch(host_batch, mesh, rules)
      tokens = float(np.prod(batch['tokens'].shape))
      flops = metrics_lib.batch_flops(cfg.model, batch)
      state, m = train_step(state, batch)
      step += 1
      if pending is not None:
        handle(pending)
      pending = (step, m, tokens, flops)
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
          print(f'radfm-jax train: periodic eval disabled: {e}', file=sys.stderr)
          eval_step = None
          eval_iter = None
        if eval_iter is not None:
          result = evaluate(eval_step, state.params, eval_iter, mesh, rules, t.eval_steps)
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
    writer.close()
    ckpt.close()
  if status == 'preempted' and is_main:
    print(f'radfm-jax train: signal {stop.signal} received; checkpoint saved at step {step} in '
          f'{ckpt.directory}', file=sys.stderr)
  return TrainResult(step=step, losses=losses, status=status, last_checkpoint=last_saved,
                     state=state)


__all__ = ['NonFiniteLossError', 'TrainResult', 'build', 'evaluate', 'global_batch', 'init_params',
           'init_state', 'make_data', 'run_dirs', 'train']
