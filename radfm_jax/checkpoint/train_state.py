"""Training checkpoints (layout "train_state"): one async Orbax CheckpointManager holding, per step,

    <step>/state    TrainState {step, params (nnx.State), opt_state}      ocp.args.StandardSave
    <step>/data     the data iterator's state: a Grain DatasetIterator via
                    grain.checkpoint.CheckpointSave (one JSON per process), any other iterator with
                    get_state()/set_state() as JSON
    <step>/config   the resolved config (JSON)

and beside the steps `config.json`: the latest resolved config + {"layout": "train_state",
"layout_version": 1} (`meta`), which `read.load` reads to find and restore the parameters.

Restoring takes an *abstract* TrainState (ShapeDtypeStructs carrying the new run's shardings,
`step.abstract_train_state`), so a checkpoint written on one mesh restores onto any other.

Resuming (`restore_latest`) falls back: a step that fails to restore (a truncated or corrupt file)
is reported in one line (file, step, reason) and the newest intact step is restored instead (the
failed one then moved aside to `<step>.corrupt`: kept, not deleted; the run writes that step again);
`fallback=False` (`radfm-jax train --no-fallback`) makes that line a `CheckpointRestoreError`.
Not detected: bytes garbled inside an array's data file whose length stays right restore as other
values (Orbax's zarr chunks carry no checksum).

Saving: Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it into place when
complete, so a kill at any moment leaves only complete steps (`rundir.remove_unfinished` clears
the rest). Removing a step past `max_to_keep` is a rename into `DIR/.deleting/` first (Orbax's
`todelete_subdir`), then `purge_deleted`: a kill during the removal leaves the half-removed step
there, out of the steps, and the next run finishes it. A save the filesystem refuses (full,
read-only) is a `WriteError` naming the step folder and the newest complete step, raised where
it surfaces (the next save, `wait`, `close`: saves run in the background).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys

import orbax.checkpoint as ocp

from radfm_jax.checkpoint import meta
from radfm_jax.errors import InputError, write_failed, write_fault, writing

# Where old steps go to be removed (see the module docstring); not a step name, so Orbax and
# `_complete_steps` never list it.
DELETING = '.deleting'


class CheckpointRestoreError(InputError):
  """A training checkpoint step does not restore (and no fallback was allowed or possible)."""

STATE_ITEM = 'state'   # the TrainState item of each step folder


def _resolve(directory: str) -> str:
  """Local paths made absolute; URLs (gs://bucket/...) kept as they are."""
  return directory if '://' in directory else os.path.abspath(directory)


def _is_grain_iterator(it) -> bool:
  try:
    import grain
  except ImportError:
    return False
  return isinstance(it, grain.DatasetIterator)


def _data_save(it):
  if it is None:
    return None
  if _is_grain_iterator(it):
    import grain
    return grain.checkpoint.CheckpointSave(it)
  if hasattr(it, 'get_state'):
    return ocp.args.JsonSave(it.get_state())
  return None


def _data_restore(it):
  if _is_grain_iterator(it):
    import grain
    return grain.checkpoint.CheckpointRestore(it)
  return ocp.args.JsonRestore()


class Checkpointer:
  """`save(step, state, data_iter, config)` / `restore(step, abstract_state, data_iter)`."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = _resolve(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=1,
                                           enable_async_checkpointing=async_save,
                                           create=True, todelete_subdir=DELETING)
    with self._writing(None):
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._record = None     # the config.json body last written by this process
    self._saving = None     # the step of the last save started (it may still run)
    self._failed = False    # a save was refused: close() then only releases the manager

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """A refused write inside the block (`write_fault`; Orbax raises the error of a background
    save at the next save or wait) -> WriteError naming the step's folder (from the failure's own
    path when it names one) and what is intact."""
    try:
      yield
    except Exception as e:   # noqa: BLE001  (OSError, TensorStore's ValueError through Orbax)
      code = write_fault(e)
      if code is None:
        raise
      self._failed = True
      chain, cause = [], e
      while cause is not None and len(chain) < 8:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
      m = re.search(r'/(\d+)\.orbax-checkpoint-tmp', ' '.join(chain))
      failed = int(m[1]) if m else (self._saving if self._saving is not None else step)
      done = self._complete_steps()
      where = self.directory if failed is None else self.step_dir(failed)
      intact = (f'the steps saved before are complete (latest: step {done[-1]}); rerun the same '
                'command to resume from it' if done else 'no step was saved')
      raise write_failed(where, code, intact) from e

  def _complete_steps(self) -> list[int]:
    """The step folders in place (a local folder; Orbax renames a step in when it is complete),
    read from the folder itself: the manager may be mid-failure."""
    if '://' in self.directory or not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

  def _write_record(self, config: dict | None):
    """DIR/config.json: the layout record + the latest config (process 0 only; rewritten when the
    config changes, and at least once so that the folder names its layout)."""
    import jax
    body = dict(config or {})
    if jax.process_index() != 0 or body == self._record or (not body and self._record is not None):
      return
    meta.write_config(self.directory, meta.TRAIN_STATE, body)
    self._record = body

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None, config: dict | None = None,
           force: bool = True) -> bool:
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    data = _data_save(data_iter)
    if data is not None:
      items['data'] = data
    if config is not None:
      items['config'] = ocp.args.JsonSave(config)
    with self._writing(int(step)):
      self._purge()                  # the steps the last save's finish moved out
      saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
      self._saving = int(step) if saved else self._saving
      if saved:
        self._write_record(config)
    return saved

  def restore(self, step: int | None, abstract_state, data_iter=None):
    """Returns (state, config dict or None); restores the data iterator's position in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    names = set(self.manager.item_metadata(step).keys()) if hasattr(
        self.manager, 'item_metadata') else {STATE_ITEM, 'data', 'config'}
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None and 'data' in names:
      items['data'] = _data_restore(data_iter)
    if 'config' in names:
      items['config'] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and 'data' in items and not _is_grain_iterator(data_iter):
      data_iter.set_state(out['data'])
    return out[STATE_ITEM], (out['config'] if 'config' in items else None)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore_latest(self, abstract_state, data_iter=None, *, fallback: bool = True, log=None):
    """Restores the newest step that restores: (step, state, config) or None when there is no
    step. A step that fails is reported through `log` (default: a line on stderr) as
    `describe_failure` words it, and the next older step is tried, unless `fallback` is False: then
    the first failure raises `CheckpointRestoreError`. Once an older step restores, the failed
    newer ones are moved aside to `<step>.corrupt` (kept; the run will write those step numbers
    again). If no step restores, nothing is moved (a config that no longer matches any step fails
    them all) and `CheckpointRestoreError` lists every failure: never a silent fresh start. The
    data iterator ends at the restored step's position."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, config = self.restore(step, abstract_state, data_iter)
      except Exception as e:   # noqa: BLE001  (Orbax, TensorStore, JSON, grain: any of them)
        line = describe_failure(self.step_dir(step), step, e)
        if not fallback:
          raise CheckpointRestoreError(
              f'{line} (--no-fallback: not falling back to an older step)') from e
        failures.append((step, line))
        log(f'{line}; trying the previous step')
        continue
      if failures:
        moved = ', '.join(f'step {bad} to {self._quarantine(bad)}' for bad, _ in failures)
        log(f'restored checkpoint step {step} of {self.directory} instead (the newest intact '
            f'step); moved {moved}')
      return step, state, config
    if failures:
      raise CheckpointRestoreError(f'no checkpoint step in {self.directory} restores: '
                                   + ' | '.join(line for _, line in failures))
    return None

  def restore_data(self, step: int, data_iter):
    """Restores only the data iterator's position of `step` (in place; no-op when not saved): for
    a run whose data can only be built once the state is restored (`restore_latest(abstract_state,
    None)` first; the image-token cache is keyed by the restored vision weights). A data item that
    does not restore is a `CheckpointRestoreError` naming the step and file."""
    names = set(self.manager.item_metadata(step).keys()) if hasattr(
        self.manager, 'item_metadata') else {'data'}
    if 'data' not in names:
      return
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(data=_data_restore(data_iter)))
      if not _is_grain_iterator(data_iter):
        data_iter.set_state(out['data'])
    except Exception as e:   # noqa: BLE001  (Orbax, JSON, grain: any of them)
      raise CheckpointRestoreError(describe_failure(self.step_dir(step), step, e)) from e

  def _quarantine(self, step: int) -> str:
    """Renames a step folder that does not restore to `<step>.corrupt` (Orbax ignores it; the run
    may write that step again) and tells the manager. Process 0 renames; all wait for it."""
    import jax
    src = self.step_dir(step)
    dst = src + '.corrupt'
    if jax.process_index() == 0:
      n = 1
      while os.path.exists(dst):
        dst, n = f'{src}.corrupt{n}', n + 1
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'radfm_quarantine_{step}')
    self.manager.reload()
    return dst

  def _purge(self, idle: bool = False):
    import jax
    if jax.process_index() == 0:     # Orbax renames on the primary host only
      purge_deleted(self.directory, idle)

  def wait(self):
    with self._writing(None):
      self.manager.wait_until_finished()
      self._purge()

  def close(self):
    """Waits for the last save, then releases the manager. After a refused save (already raised)
    it only releases: the error is not raised twice, from a `finally`."""
    if self._failed:
      with contextlib.suppress(Exception):
        self.manager.close()
      return
    with self._writing(None):
      self.manager.wait_until_finished()
      self._purge(idle=True)
    self.manager.close()


def purge_deleted(directory: str, idle: bool = True) -> list[str]:
  """Removes the old steps Orbax moved into DIRECTORY/.deleting/ (a local folder; on a URL Orbax
  deletes them itself) and returns their paths; `idle` (no save running, which may be moving a
  step in) removes the emptied folder too."""
  folder = os.path.join(directory, DELETING)
  if '://' in directory or not os.path.isdir(folder):
    return []
  removed = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    with writing(path):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    removed.append(path)
  if idle:
    with writing(folder):
      os.rmdir(folder)
  return removed


_JSON_FILES = re.compile(r'(^|/)(_METADATA|_CHECKPOINT_METADATA|metadata|_sharding|'
                         r'array_metadatas/process_\d+|[^/]+\.json)$')


def _broken_json(step_dir: str) -> tuple[str, str] | None:
  """(path, error) of the first JSON file of a step folder that does not parse: the metadata
  Orbax writes, the config and the data iterator's state (JsonSave `data/metadata`, grain's
  `data/process_*.json`), whose own errors name no file."""
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      if not _JSON_FILES.search(os.path.relpath(path, step_dir)):
        continue
      try:
        with open(path) as f:
          json.load(f)
      except (ValueError, UnicodeDecodeError) as e:
        return path, ' '.join(str(e).split())
  return None


def describe_failure(step_dir: str, step: int | None, error: BaseException) -> str:
  """One line: which file of the step failed and why. A JSON file that does not parse is named
  from the folder itself; otherwise the first message in the exception chain that names a path
  (TensorStore's do: the OCDBT file and the array key); otherwise the step folder. `step` None:
  a parameter-only checkpoint (`step_dir` is its folder)."""
  broken = _broken_json(step_dir)
  if broken is not None:
    path, reason = broken
    return f'{step_name(step)}: {path}: does not parse ({reason})'
  chain, e = [], error
  while e is not None and len(chain) < 8:
    chain.append(' '.join(str(e).split()))
    e = e.__cause__ or e.__context__
  named = [m for m in chain if step_dir in m or 'local file' in m]
  reason = named[-1] if named else f'{type(error).__name__}: {chain[0]}'
  reason = reason.split(' [tensorstore_spec')[0]        # the spec dump adds nothing to read
  # paths inside the step folder relative to it (the line names the folder once), then bounded
  reason = reason.replace(step_dir.rstrip('/') + '/', '')[:500]
  return f'{step_name(step)}: {step_dir}: does not restore ({reason})'


def step_name(step: int | None) -> str:
  return 'checkpoint' if step is None else f'checkpoint step {step}'


def read_step_config(directory: str, step: int | None = None) -> dict:
  """The resolved config saved with one step of a Checkpointer folder (latest step by default)."""
  mngr = ocp.CheckpointManager(_resolve(directory))
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  mngr.close()
  return out['config']


__all__ = ['CheckpointRestoreError', 'Checkpointer', 'describe_failure', 'read_step_config']
