"""LoRA / QLoRA adapters on RadFM through Qwix, and folding them back into the base weights.

    model = add_adapters(create_model(cfg.model), cfg.finetune, seed=0)    # same logits at init
    graphdef, abstract = abstract_model(cfg.model, cfg.finetune, mesh, rules)
    plain = merge(model)                 # a plain RadFM: W + a @ b * alpha / rank (dequantized)

Qwix (`qwix.LoraProvider`) intercepts `jax.lax.dot_general` while the model's `__call__` runs: a
matmul of a module whose path fully matches one of `finetune.targets` (`llama/layers/q`; stacked
layers have one module for all layers, so no layer index) gets `kernel_lora_a` [.., in, rank] and
`kernel_lora_b` [.., rank, out] (`nnx.LoRAParam`, `in` / `out` the kernel's input / output dims
flattened, b initialised to zeros) and adds (x @ a @ b) * alpha / rank. With `qlora` the frozen
kernel is replaced by an int8 / int4 `WithAux(QArray)` on the first call (per-output-channel
scales in the parameter dtype), and the adapters take the parameter dtype.

Scanned layers: Qwix puts one shared `nnx.Rngs` on every module for the adapters' init; inside a
stacked tower its scalar key would be scanned over the `layers` axis (`IndexError` in
`jax.lax.scan`). `add_adapters` therefore gives the modules of each stacked tower an Rngs split
over that tower's layers (`nnx.split_rngs`) and removes every Rngs once the adapters exist. The
first call runs with `scan_layers=True` (the Python loop of `layers.run_layers` works on per-layer
copies, where new Variables would be lost) and XLA attention (splash needs a batch its mesh
divides); afterwards the model runs as configured.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax import sharding
from radfm_jax.config import FREEZE_GROUPS, ConfigError, FinetuneConfig, ModelConfig
from radfm_jax.models import radfm

ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')


def stacks(cfg: ModelConfig) -> dict[tuple[str, str], int]:
  """The stacked towers (module path -> number of layers)."""
  return {('vision', 'blocks'): cfg.vision.depth, ('perceiver', 'layers'): cfg.perceiver.depth,
          ('llama', 'layers'): cfg.llama.num_layers}


def provider(ft: FinetuneConfig):
  """The Qwix LoraProvider of a finetune section (one rule per target pattern)."""
  import qwix
  qtype = {'lora': None, 'qlora': ft.quant}[ft.method]
  return qwix.LoraProvider([
      qwix.LoraRule(module_path=pattern, rank=ft.rank, alpha=ft.alpha, dropout=ft.dropout,
                    weight_qtype=qtype) for pattern in ft.targets])


def set_qwix_rngs(model: nnx.Module, cfg: ModelConfig, key: jax.Array | None,
                  stream: str = 'params'):
  """Gives every module the Rngs Qwix draws from (`qwix_rngs`): split over the layers inside a
  stacked tower, one key elsewhere; `key=None` removes them (no RNG state left in the model)."""
  if key is None:
    model.set_attributes(qwix_rngs=None, raise_if_not_found=False)
    return
  top = nnx.Rngs(**{stream: jax.random.fold_in(key, 0)})
  per_stack = {path: nnx.split_rngs(nnx.Rngs(**{stream: jax.random.fold_in(key, i + 1)}),
                                    splits=n, graph_updates=False)
               for i, (path, n) in enumerate(stacks(cfg).items())}
  for path, module in nnx.iter_modules(model):
    module.qwix_rngs = per_stack.get(tuple(str(p) for p in path[:2]), top)


def example_inputs(cfg: ModelConfig):
  """Small (tokens, images) that run every matmul of the model once (128 tokens: the splash
  kernel's block)."""
  v = cfg.vision
  return (jnp.zeros((1, 128), jnp.int32),
          jnp.zeros((1, 1, v.channels, v.patch_size, v.patch_size, v.frame_patch_size),
                    jnp.float32))


def add_adapters(model: radfm.RadFM, ft: FinetuneConfig, seed: int = 0) -> radfm.RadFM:
  """A copy of `model` with LoRA adapters (and, for `qlora`, quantized base kernels) on every
  matmul whose module path fully matches a `ft.targets` pattern. Its logits equal the base's
  (lora) until the adapters train. Raises ConfigError when a pattern matches no matmul."""
  import qwix
  cfg = model.cfg
  prov = provider(ft)
  adapted = qwix.apply_lora_to_model(model, prov, skip_nnx_init=True, rngs=nnx.Rngs(seed))
  set_qwix_rngs(adapted, cfg, jax.random.key(seed))
  # The first call creates the adapters: scanned layers, and XLA attention (the splash kernel
  # shards its batch over the mesh, which one example row does not divide).
  # Qwix adds the adapters inside the product, which the custom backward of
  # `model.dense_backward='transposed'` would hide from autodiff: adapted models keep JAX's own.
  adapted.set_attributes(scan_layers=True, attention_impl='xla', dense_backward='autodiff',
                         raise_if_not_found=False)
  if ft.method == 'qlora':    # Qwix quantizes the kernel as the dot sees it (layers.Dense)
    adapted.set_attributes(flat_matmul=False, raise_if_not_found=False)
  adapted(*example_inputs(cfg))
  adapted.set_attributes(scan_layers=cfg.scan_layers, attention_impl=cfg.attention,
                         raise_if_not_found=False)
  set_qwix_rngs(adapted, cfg, None)
  unused = prov.get_unused_rules()
  if unused:
    raise ConfigError(f'config field finetune.targets={list(ft.targets)!r}: pattern '
                      f'{unused[0].module_path!r} matches no matmul; expected full matches of '
                      'module paths such as llama/layers/q, llama/layers/down, vision/blocks/q, '
                      'perceiver/layers/ff_in, fc')
  return adapted


def build(cfg: ModelConfig, ft: FinetuneConfig, seed: int = 0, params=None) -> radfm.RadFM:
  """A RadFM (random weights from `seed`, or `params`: a plain model's State) with the adapters
  of `ft` (none for method `full`). Meant to run inside `jax.jit` / `nnx.eval_shape`."""
  model = radfm.RadFM(cfg, rngs=nnx.Rngs(seed))
  if params is not None:
    nnx.update(model, params)
  if ft.method == 'full':
    return model
  return add_adapters(model, ft, seed)


def abstract_model(cfg: ModelConfig, ft: FinetuneConfig, mesh=None, rules=None):
  """(graphdef, abstract State) of the adapted model, allocating nothing (ShapeDtypeStructs
  carrying their shardings when a mesh is given); the plain model's for method `full`."""
  if ft.method == 'full':
    return radfm.abstract_model(cfg, mesh, rules)
  make = lambda: build(cfg, ft)
  if mesh is None:
    with nnx.use_eager_sharding(False):
      return nnx.split(nnx.eval_shape(make))
  with nnx.logical_axis_rules(rules or sharding.LOGICAL_RULES['fsdp']):
    return nnx.get_abstract_model(make, mesh)


# ------------------------------------------------------------------------------------------------
# Which parameters train


def path_names(path) -> list[str]:
  """A State / pytree key path as plain names ('llama', 'layers', 'q', 'kernel_lora_a')."""
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return [n for n in names if n != 'value']


def is_adapter(path) -> bool:
  return path_names(path)[-1].endswith(ADAPTER_SUFFIXES)


def trainable_filter(ft: FinetuneConfig):
  """`(path, value) -> bool` for a LoRA run: the adapters, and every parameter of the towers
  named in `finetune.train_full` (FREEZE_GROUPS names)."""
  full = {m for name in ft.train_full for m in FREEZE_GROUPS[name]}

  def is_trainable(path, _value) -> bool:
    return is_adapter(path) or path_names(path)[0] in full
  return is_trainable


# ------------------------------------------------------------------------------------------------
# Merge


def _dense_weight(module) -> jax.Array:
  """A Dense's kernel as a float array (dequantized when Qwix holds it as WithAux(QArray))."""
  kernel = module.kernel
  if isinstance(kernel, nnx.Variable):
    return kernel[...]
  import qwix
  from qwix._src.utils import flax_util
  return qwix.dequantize(flax_util.unbox(kernel.array))


def merged_kernel(module, alpha: float, rank: int, dtype) -> jax.Array:
  """W + (a @ b) * alpha / rank in the kernel's shape [(layers,) *in, *out]."""
  weight = _dense_weight(module).astype(jnp.float32)
  a = module.kernel_lora_a[...].astype(jnp.float32)        # [(layers,) in, rank]
  b = module.kernel_lora_b[...].astype(jnp.float32)        # [(layers,) rank, out]
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * (alpha / rank)
  return (weight + delta.reshape(weight.shape)).astype(dtype)


def merge(model: radfm.RadFM, ft: FinetuneConfig) -> radfm.RadFM:
  """The plain RadFM whose every adapted kernel is W + a @ b * alpha / rank (QLoRA: the
  dequantized W), everything else copied: the model `convert to-torch`, `save` and generation
  take. Its logits equal the adapted model's up to float rounding."""
  cfg = model.cfg
  pure = nnx.to_pure_dict(nnx.state(model))
  for path, module in nnx.iter_modules(model):
    if hasattr(module, 'kernel_lora_a'):
      node = pure
      for key in path:
        node = node[key]
      node['kernel'] = merged_kernel(module, ft.alpha, ft.rank, jnp.dtype(cfg.param_dtype))
      for suffix in ADAPTER_SUFFIXES:
        del node['kernel' + suffix]
  graphdef, state = radfm.abstract_model(cfg)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def adapter_count(state) -> int:
  """Number of adapter values in a State."""
  return sum(int(np.prod(v.shape)) for path, v in jax.tree_util.tree_leaves_with_path(state)
             if is_adapter(path))


__all__ = ['abstract_model', 'add_adapters', 'adapter_count', 'build', 'example_inputs',
           'is_adapter', 'merge', 'merged_kernel', 'path_names', 'provider', 'set_qwix_rngs',
           'stacks', 'trainable_filter']
