"""Reading the parameters of either checkpoint layout, by the layout its config.json names.

    model, cfg = load('ckpt/')                       # a parameter-only checkpoint (`save`, convert)
    model, cfg = load('workdir/', step=500)          # a training run (or its checkpoints/, a step)
    leaf = LeafReader('ckpt/'); leaf('llama/layers/gate/kernel', 3)     # one layer as numpy

`locate` turns a folder into the Orbax PyTree folder holding the parameters and the keys they sit
under there; only those leaves are read (never a TrainState's optimizer moments), straight into
their NamedShardings, so a checkpoint written on one mesh restores onto any other.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os

import numpy as np

from radfm_jax.checkpoint import meta
from radfm_jax.casting import checked_cast
from radfm_jax.checkpoint.params import PARAMS_DIR
from radfm_jax.checkpoint.train_state import (STATE_ITEM, CheckpointRestoreError, describe_failure,
                                              step_name)
from radfm_jax.config import ModelConfig
from radfm_jax.errors import InputError, MissingStepError, StepError
from radfm_jax.checkpoint.tree import flat_params, unflatten

@dataclasses.dataclass(frozen=True)
class Location:
  """Where a checkpoint's parameters are: `tree` (an Orbax PyTree folder) holds parameter `p`
  (`llama/embed_tokens`, ...) at key path prefix + p + suffix. A TrainState nests the parameters
  under 'params' and saves each nnx Variable as {'value': array}."""
  config_path: str
  layout: str
  cfg: ModelConfig
  tree: str
  prefix: tuple[str, ...]
  suffix: tuple[str, ...]
  step: int | None


def _steps(root: str) -> list[int]:
  """The committed steps of a Checkpointer folder (Orbax renames a step into place when done)."""
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root)
                if n.isdigit() and os.path.isdir(os.path.join(root, n, STATE_ITEM)))


def locate(directory: str, step: int | None = None) -> Location:
  """The parameters of the checkpoint at `directory`: a parameter-only checkpoint, a training
  workdir, its checkpoints/ folder or one step folder; `step` picks a training step (default: the
  folder's own step, else the latest). A folder that is not a checkpoint, or holds no parameters,
  is an InputError naming it (`meta.read_record`); a step it lacks, a `StepError` (an InputError
  that a command prefixes with its flag: `errors.reading`)."""
  if step is not None:
    if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
      raise InputError(f'step {step!r}: expected a training step (an integer >= 0), or None for '
                       'the latest')
    step = int(step)
  path, data, layout = meta.read_record(directory)
  cfg = meta.model_config_of(path, data)
  home = os.path.dirname(path)
  if layout == meta.PARAMS:
    if step is not None:
      raise StepError(f'{path}: a parameter-only checkpoint (layout "params") has no step {step}')
    tree = os.path.join(home, PARAMS_DIR)
    if not os.path.isdir(tree):
      raise InputError(f'{tree}: missing; {path} names layout "params", which keeps the '
                       f'parameters in {PARAMS_DIR}/ beside it')
    return Location(path, layout, cfg, tree, (), (), None)
  # The previous release's config.json (no layout field) sat in the workdir, above checkpoints/.
  root = home if 'layout' in data else os.path.join(home, 'checkpoints')
  steps = _steps(root)
  rel = os.path.relpath(meta.checkpoint_folder(directory), root).split(os.sep)
  if rel[0].isdigit():                      # a step folder (or a folder inside one)
    if step is not None and step != int(rel[0]):
      raise StepError(f'{directory} is step {rel[0]}, but step={step} was asked for')
    step = int(rel[0])
  if step is None:
    if not steps:
      raise InputError(f'{root}: no committed step (expected <step>/{STATE_ITEM}/ folders '
                       f'beside {path}: a run that saved a checkpoint)')
    step = steps[-1]
  elif step not in steps:
    raise MissingStepError(f'{root}: no step {step} (steps: {steps})')
  tree = os.path.join(root, str(step), STATE_ITEM)
  return Location(path, layout, cfg, tree, ('params',), ('value',), step)


def _key(loc: Location, path: str) -> tuple[str, ...]:
  return loc.prefix + tuple(path.split('/')) + loc.suffix


def _restore(loc: Location, target: dict, as_numpy: bool) -> dict:
  """Partial Orbax restore of the (nested) `target` of ShapeDtypeStructs; returns that structure."""
  import jax
  import orbax.checkpoint as ocp

  flat = flat_params(target)
  item = unflatten({'/'.join(_key(loc, p)): v for p, v in flat.items()})

  def args_for(sds):
    if as_numpy:
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=sds.dtype)
    return ocp.ArrayRestoreArgs(sharding=sds.sharding, global_shape=sds.shape, dtype=sds.dtype)

  restore_args = jax.tree.map(args_for, item)
  try:
    out = ocp.PyTreeCheckpointer().restore(loc.tree, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:   # noqa: BLE001  (Orbax / TensorStore / JSON: a corrupt or truncated file)
    folder = loc.tree if loc.step is None else os.path.dirname(loc.tree)
    raise CheckpointRestoreError(describe_failure(folder, loc.step, e)) from e
  out = flat_params(out)
  return unflatten({p: out['/'.join(_key(loc, p))] for p in flat})


def tree_metadata(loc: Location) -> dict:
  """The checkpoint tree's `_METADATA`: what it holds (the parameters' key paths) and how (OCDBT,
  zarr3). Orbax writes it with every tree, so a tree without it was not completely written or
  copied: `load` and `LeafReader` both refuse it with the same one line (read without it, `load`
  could not see a stored parameter the config does not describe, and would drop it)."""
  path = os.path.join(loc.tree, '_METADATA')
  name = step_name(loc.step)
  if not os.path.isfile(path):
    raise CheckpointRestoreError(f'{name}: {path}: missing; expected the tree metadata Orbax '
                                 'writes with every checkpoint (was it completely written or '
                                 'copied?)')
  try:
    with open(path, 'rb') as f:
      data = json.loads(f.read())
  except (OSError, ValueError) as e:     # UnicodeDecodeError is a ValueError
    raise CheckpointRestoreError(f'{name}: {path}: does not parse '
                                 f'({" ".join(str(e).split())})') from None
  if not isinstance(data, dict) or not isinstance(data.get('tree_metadata'), dict):
    raise CheckpointRestoreError(f'{name}: {path}: no "tree_metadata" object; expected the tree '
                                 'metadata Orbax writes with every checkpoint')
  return data


def _stored_paths(loc: Location) -> list[str]:
  """The parameter paths ('llama/norm/scale') the checkpoint tree holds, from its `_METADATA`."""
  import ast
  keys = []
  for key in tree_metadata(loc)['tree_metadata']:
    try:
      keys.append(ast.literal_eval(key))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
      raise CheckpointRestoreError(
          f'{step_name(loc.step)}: {os.path.join(loc.tree, "_METADATA")}: does not parse (key '
          f'{str(key)[:80]!r} is not a key path)') from None
  n, m = len(loc.prefix), len(loc.suffix)
  return ['/'.join(k[n:len(k) - m]) for k in keys if isinstance(k, tuple)
          and k[:n] == loc.prefix and (not m or k[-m:] == loc.suffix)]


def _check_no_extra_leaves(loc: Location, expected: dict):
  """The restore is partial (Orbax reads what the target names), so a stored parameter the model
  config.json describes does not have would be dropped without a word: e.g. the adapters of a
  module a hand-edited finetune.targets no longer names. A CheckpointRestoreError instead."""
  extra = sorted(set(_stored_paths(loc)) - set(expected))
  if extra:
    raise CheckpointRestoreError(
        f'{loc.tree}: holds {len(extra)} parameters that the config.json beside it does not '
        f'describe (e.g. {extra[0]}); expected the config the checkpoint was written with')


class LeafReader:
  """Reads parameters from a checkpoint (either layout) as numpy, one layer of one leaf at a time.

      leaf = LeafReader('ckpt/'); leaf('llama/layers/gate/kernel', 3)   # [hidden, mlp]

  Leaves are opened with TensorStore at the spec Orbax wrote them with (zarr or zarr3, plain files
  or OCDBT, from the tree's `_METADATA`), which allows reading a slice; if that fails, the whole
  leaf is restored through Orbax.
  """

  def __init__(self, directory: str, step: int | None = None):
    from flax import nnx

    from radfm_jax.models.radfm import abstract_model
    self.location = locate(directory, step)
    method = finetune_of(directory).method
    if method != 'full':
      # Its base kernels alone are not the trained model (and may be quantized).
      raise InputError(f'{self.location.config_path}: a {method} run; expected a plain model: '
                       f'fold its adapters into the base first: radfm-jax merge --checkpoint '
                       f'{directory} --out MERGED')
    self.cfg = self.location.cfg
    _, state = abstract_model(self.cfg)
    self.abstract = flat_params(nnx.to_pure_dict(state))
    tree_meta = tree_metadata(self.location)
    # As `load`: a stored parameter the model does not have would be left out of the export.
    _check_no_extra_leaves(self.location, self.abstract)
    self._ocdbt = tree_meta.get('use_ocdbt', True)
    self._zarr3 = tree_meta.get('use_zarr3', False)
    self._open = {}

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {p: tuple(v.shape) for p, v in self.abstract.items()}

  def _tensorstore(self, path: str):
    import tensorstore as ts
    if path not in self._open:
      name, tree = '.'.join(_key(self.location, path)), self.location.tree
      if self._ocdbt:
        kv = {'driver': 'ocdbt', 'base': f'file://{tree}', 'path': name}
      else:
        kv = {'driver': 'file', 'path': os.path.join(tree, name)}
      try:
        # A missing chunk file must be an error, not the fill value (a leaf of zeros).
        self._open[path] = ts.open({'driver': 'zarr3' if self._zarr3 else 'zarr', 'kvstore': kv,
                                    'fill_missing_data_reads': False},
                                   open=True, read=True).result()
      except Exception:   # noqa: BLE001  (any layout we cannot open directly: use Orbax)
        self._open[path] = None
    return self._open[path]

  def __call__(self, path: str, index: int | None = None) -> np.ndarray:
    import jax
    sds = self.abstract[path]
    array = self._tensorstore(path)
    if array is not None and (tuple(array.shape), np.dtype(array.dtype.numpy_dtype)) != (
        tuple(sds.shape), np.dtype(sds.dtype)):
      raise CheckpointRestoreError(
          f'{self.location.tree}: parameter {path} is stored as {list(array.shape)} '
          f'{array.dtype.numpy_dtype}, but the config.json beside it makes it {list(sds.shape)} '
          f'{np.dtype(sds.dtype)}; expected the config the checkpoint was written with')
    if array is not None:
      try:
        out = (array if index is None else array[index]).read().result()
      except Exception as e:   # noqa: BLE001  (TensorStore: a missing, cut or corrupt chunk)
        folder = self.location.tree if self.location.step is None else os.path.dirname(
            self.location.tree)
        raise CheckpointRestoreError(describe_failure(folder, self.location.step, e)) from e
    else:
      abstract = unflatten({path: jax.ShapeDtypeStruct(sds.shape, sds.dtype)})
      out = flat_params(_restore(self.location, abstract, as_numpy=True))[path]
      out = out if index is None else out[index]
    return checked_cast(np.asarray(out), sds.dtype, f'{self.location.tree} parameter {path}')


def finetune_of(directory: str):
  """The FinetuneConfig a checkpoint was trained with (method `full` when none is recorded),
  validated: a section edited by hand (method 'dora', a rank of 0) is a ConfigError naming the
  file, not a KeyError in the adapters' code."""
  from radfm_jax.checkpoint.meta import find_config, read_section
  from radfm_jax.config import ConfigError, FinetuneConfig, validate_finetune
  finetune = FinetuneConfig(**read_section(directory, 'finetune', FinetuneConfig))
  try:
    validate_finetune(finetune)
  except ConfigError as e:
    raise ConfigError(f'{find_config(directory)}: {e}') from None
  return finetune


def load(directory: str, *, step: int | None = None, mesh=None, rules=None):
  """Any checkpoint -> (RadFM model, ModelConfig), parameters sharded over the devices.

  directory: a parameter-only checkpoint, a training workdir, its `checkpoints/` folder or one step
  folder (`locate`); step: a training step (default the latest). mesh: a `jax.sharding.Mesh` with
  axes (data, fsdp, tensor), default one `fsdp` axis over every device; rules: logical rules
  (default `LOGICAL_RULES['fsdp']`). Only parameters are read (never optimizer moments), straight
  into their NamedShardings; nothing is initialised randomly first. A LoRA / QLoRA run
  (`finetune.method` in its config.json) comes back with its adapters folded into the base
  (`models.lora.merge`): a plain model.
  """
  from flax import nnx

  from radfm_jax import sharding
  from radfm_jax.config import MeshConfig
  from radfm_jax.models import lora

  loc = locate(directory, step)
  if mesh is None:
    mesh = sharding.make_mesh(MeshConfig())
  rules = rules or sharding.LOGICAL_RULES['fsdp']
  sharding.check_mesh_and_rules(mesh, rules)
  ft = finetune_of(directory) if loc.layout != meta.PARAMS else None
  if ft is None or ft.method == 'full':
    from radfm_jax.config import FinetuneConfig
    ft = FinetuneConfig()
  graphdef, state = lora.abstract_model(loc.cfg, ft, mesh, rules)
  _check_no_extra_leaves(loc, flat_params(nnx.to_pure_dict(state)))
  restored = _restore(loc, nnx.to_pure_dict(state), as_numpy=False)
  nnx.replace_by_pure_dict(state, restored)
  model = nnx.merge(graphdef, state)
  if ft.method != 'full':
    with sharding.use_mesh(mesh, rules):
      model = lora.merge(model, ft)
  return model, loc.cfg
