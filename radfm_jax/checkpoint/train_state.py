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
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from radfm_jax.checkpoint import meta

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
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._record = None     # the config.json body last written by this process

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
    saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
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

  def restore_data(self, step: int, data_iter):
    """Restores only the data iterator's position of `step` (in place; no-op when not saved)."""
    names = set(self.manager.item_metadata(step).keys()) if hasattr(
        self.manager, 'item_metadata') else {'data'}
    if 'data' not in names:
      return
    out = self.manager.restore(step, args=ocp.args.Composite(data=_data_restore(data_iter)))
    if not _is_grain_iterator(data_iter):
      data_iter.set_state(out['data'])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def read_step_config(directory: str, step: int | None = None) -> dict:
  """The resolved config saved with one step of a Checkpointer folder (latest step by default)."""
  mngr = ocp.CheckpointManager(_resolve(directory))
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  mngr.close()
  return out['config']


__all__ = ['Checkpointer', 'read_step_config']
