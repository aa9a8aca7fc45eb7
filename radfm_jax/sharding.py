"""Meshes and logical-axis sharding: the one mesh builder and the rule tables.

Model code names axes logically (`embed`, `mlp`, `heads`, `act_batch`, ...). The tables below map
those names onto the mesh axes `data`, `fsdp`, `tensor`; picking a preset is a config choice
(`mesh.rules`), never a code change. Every logical name used in `radfm_jax/models` appears in every
table (an unmapped name would be taken for a mesh axis).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

from radfm_jax.config import BATCH_AXES, MESH_AXES, MeshConfig, resolve_mesh_shape

_BATCH = BATCH_AXES

# Logical axis -> mesh axes. Parameters are sharded over `fsdp` on one dimension each (ZeRO-3
# style); activations over the batch. Norm scales and the small position tables stay replicated.
_COMMON = (
    # parameters
    ('layers', None),
    ('embed', 'fsdp'),
    ('vis_embed', 'fsdp'),
    ('vis_patch', None),
    ('vis_pos', None),
    ('vis_proj', None),
    ('latents', None),
    ('norm', None),
    ('kv', None),
    ('vis_kv', None),
    # activations
    ('act_batch', _BATCH),
    ('act_len', None),
    ('act_embed', None),
    ('act_kv', None),
    ('act_patches', None),
    ('act_latents', None),
    ('act_images', None),
)

LOGICAL_RULES = {
    'fsdp': _COMMON + (
        ('mlp', None), ('heads', None), ('vocab', None), ('vis_mlp', None), ('vis_heads', None),
        ('act_mlp', None), ('act_heads', None), ('act_vocab', None),
    ),
    # Tensor parallelism (Megatron style) on heads / MLP / vocab on top of FSDP.
    'fsdp_tp': _COMMON + (
        ('mlp', 'tensor'), ('heads', 'tensor'), ('vocab', 'tensor'), ('vis_mlp', 'tensor'),
        ('vis_heads', 'tensor'), ('act_mlp', 'tensor'), ('act_heads', 'tensor'),
        ('act_vocab', 'tensor'),
    ),
}


def rules_for(mesh_cfg: MeshConfig):
  return LOGICAL_RULES[mesh_cfg.rules]


def check_mesh_and_rules(mesh, rules) -> None:
  """InputError naming the argument when a caller's `mesh` is not a jax.sharding.Mesh, or its
  `rules` are not (logical axis, mesh axis or axes or None) pairs over that mesh's axes (else a
  traceback from deep inside JAX or Flax at the first sharded array)."""
  from radfm_jax.errors import InputError
  if not isinstance(mesh, jax.sharding.Mesh):
    raise InputError(f'mesh: got {type(mesh).__name__}; expected a jax.sharding.Mesh (axes '
                     f'{MESH_AXES}: radfm_jax.sharding.make_mesh) or None')
  expected = ("expected (logical axis, mesh axis) pairs, e.g. "
              "radfm_jax.sharding.LOGICAL_RULES['fsdp'], or None")
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise InputError(f'rules: got {type(rules).__name__}; {expected}')
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise InputError(f'rules[{i}]: got {rule!r}; {expected}')
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    missing = [a for a in axes if a is not None and a not in mesh.axis_names]
    if missing:
      raise InputError(f'rules[{i}] {tuple(rule)!r}: mesh axis {missing[0]!r} is not one of the '
                       f'mesh\'s axes {tuple(mesh.axis_names)}; expected a mesh with axes '
                       f'{MESH_AXES} (radfm_jax.sharding.make_mesh) or rules over its axes')


# ------------------------------------------------------------------------------------------------
# Mesh


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh over `devices` (default: all), axes (`data`, `fsdp`, `tensor`), always Auto-typed.

  Several slices (TPU multislice, or GPU nodes given as dcn sizes > 1) get a hybrid mesh whose
  slower dcn axis is outermost; one slice gets a plain device mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = resolve_mesh_shape(mesh_cfg.ici, mesh_cfg.dcn, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  from jax.experimental import mesh_utils
  num_granules = math.prod(dcn)
  granule_ids = {getattr(d, 'slice_index', d.process_index) for d in devices}
  if num_granules > 1 and len(granule_ids) == num_granules:
    # Real slices / nodes: ICI axes inside a granule, DCN axes across granules.
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not hasattr(devices[0], 'slice_index'),
        allow_split_physical_axes=True)
  elif num_granules > 1:
    # One host emulating several granules (tests): the same layout, dcn outermost on each axis.
    grid = np.asarray(devices).reshape(dcn + ici)
    grid = grid.transpose(0, 3, 1, 4, 2, 5).reshape([d * i for d, i in zip(dcn, ici)])
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(ici)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules):
  """Mesh + logical rules context: model creation inside it makes parameters already sharded."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


# ------------------------------------------------------------------------------------------------
# Logical names -> shardings


def logical_to_spec(logical_axes: Sequence[str | None], rules=None) -> PartitionSpec:
  rules = dict(rules if rules is not None else flax_spmd.get_logical_axis_rules())
  out = []
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise KeyError(f'logical axis {name!r} has no sharding rule (known: {sorted(rules)})')
    out.append(rules[name])
  return PartitionSpec(*out)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside a mesh + rules context."""
  rules = flax_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def state_shardings(state, mesh: jax.sharding.Mesh, rules):
  """NamedShardings for an NNX state (abstract or concrete) from its variables' logical names."""
  with nnx.logical_axis_rules(rules):
    return nnx.get_named_sharding(state, mesh)


def optimizer_shardings(tx, abstract_params, param_shardings, mesh):
  """Optimizer-state shardings derived from the parameter shardings (moments follow their params).

  A plain `jax.eval_shape(tx.init, ...)` returns unsharded structs, which would replicate every
  moment; `optax.tree_map_params` walks the state and pairs each moment with its parameter.
  """
  import optax

  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated_fraction(abstract_tree, shardings) -> float:
  """Fraction of the tree's bytes stored whole on every device (no sharded dimension)."""
  total = replicated = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    if sharding.is_fully_replicated:
      replicated += nbytes
  return replicated / max(total, 1)


def check_replication(abstract_tree, shardings, limit: float = 0.02):
  """Fails loudly when more than `limit` of the parameter bytes would be replicated."""
  fraction = replicated_fraction(abstract_tree, shardings)
  if fraction > limit:
    raise ValueError(f'{fraction:.1%} of parameter bytes are replicated on every device '
                     f'(limit {limit:.0%}): check mesh.rules and the logical axis names')
  return fraction
