"""Fast decoding on XLA:CPU: the decoder re-laid for unrolled single-token steps.

`generate.layer_loop = 'unrolled'` (the CPU default) decodes with a `DecodeView` of the model's
`Llama` and a `PerLayerCache`; the math is the model's own `DecoderLayer`, only the layout of the
weights and of the cache changes (measured in benchmarks/generate.py):
- the stacked layers become `num_layers` separate modules, and the cache per-layer arrays: a scan
  (or a static index) slices each layer's weights and cache slab out of the stacked arrays at every
  step, a copy of the whole decoder per token;
- every matmul kernel is stored output-first as a matrix [out, in] (`OutFirstDense`): XLA:CPU
  multiplies [batch, in] by an [out, in] matrix up to ~1.8x faster than by [in, out], and
  products of 2-32 rows run feature-major (`feature_major_product`);
- the view is made by one jitted function and kept for the next call while the decoder's arrays
  are the same objects (`decode_view_state`, `clear_decode_view_cache`);
- the decode program is compiled with region-analysis copy insertion (`COMPILER_OPTIONS`).
"""

from __future__ import annotations

import functools
import math
import weakref

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from radfm_jax.config import LlamaConfig
from radfm_jax.infer import panel_kernel
from radfm_jax.models import llama as llama_lib
from radfm_jax.models.layers import (Dense, cast, constrain, int8_kernel, int8_rows_product,
                                     quantized, value)
from radfm_jax.models.llama import LayerCache, Llama

# XLA:CPU's default copy insertion cannot see that the cache update in the loop body comes after
# the attention that reads the old cache, and copies every layer's cache at every step; its
# region analysis can.
COMPILER_OPTIONS = {'xla_cpu_copy_insertion_use_region_analysis': True}

# Up to this many rows (batch x new tokens), `OutFirstDense` products run feature-major.
FEATURE_MAJOR_MAX_ROWS = 32


def out_first_product(kernel: jax.Array, rows: jax.Array) -> jax.Array:
  """kernel [out, in] x rows [n, in] -> [n, out]: a plain 2D product contracting both minor
  dimensions (XLA:CPU would transpose, i.e. copy, a higher-rank kernel into [in, out] order
  first), feature-major for 2..FEATURE_MAJOR_MAX_ROWS rows."""
  if 1 < rows.shape[0] <= FEATURE_MAJOR_MAX_ROWS:
    return feature_major_product(kernel, rows)
  return jax.lax.dot_general(rows, kernel, (((1,), (1,)), ((), ())))


def feature_major_product(kernel: jax.Array, rows: jax.Array) -> jax.Array:
  """kernel [out, in] x rows [n, in] -> [n, out], computed as kernel @ rows^T.

  A skinny product [n, in] x [in, out] (2 <= n <= 32: a batched decode step) runs at ~45 GFLOP/s
  on XLA:CPU, its GEMM kernels being tiled for many rows; as [out, in] x [in, n] the long side is
  the kernel's and the same product runs at 75-110 GFLOP/s (a batch-8 step of the `bench` decoder:
  23 -> 14 ms of matmuls). The optimization barriers keep XLA's simplifier from folding the two
  small transposes back into the dot's dimension numbers, which restores the slow form.
  """
  rows_t = jax.lax.optimization_barrier(rows.T)
  return jax.lax.optimization_barrier(kernel @ rows_t).T


class OutFirstDense(nnx.Module):
  """A `Dense` with its kernel re-laid as the matrix [prod(out_shape), prod(in_shape)]: the same
  product (`out_first_product`), the values unchanged. With `lanes` (`generate.cpu_product =
  'panels'`) the kernel is held packed for `panel_kernel` instead ([ceil(out / lanes), in,
  lanes]; a quantize='int8' kernel as int8 panels and its scales) and multiplied by it;
  quantize='w8a8' keeps its int8 product."""

  def __init__(self, dense: Dense, lanes: int = 0):
    self.n_in, self.out_shape = dense.n_in, dense.out_shape
    self.bias = dense.bias
    self.int8_activations = getattr(dense, 'int8_activations', False)
    self.lanes = 0
    if self.int8_activations or (lanes and quantized(dense.kernel)):
      q = int8_kernel(dense.kernel, dense.n_in)                 # [in, out], scales [1, out]
      if self.int8_activations:
        # quantize='w8a8': the int8 values [out, in] and their scales [out, 1], kept int8
        self.qvalue, self.scale = nnx.Param(q.qvalue.T), nnx.Param(q.scale.T)
      else:
        # quantize='int8' (weight-only) with the panel kernel: int8 panels and one float32
        # scale per output, a quarter of the bytes per product
        self.lanes, self.n_out = lanes, q.qvalue.shape[1]
        self.panels = nnx.Param(panel_kernel.pack(q.qvalue.T, lanes))
        self.scale = nnx.Param(q.scale.reshape(-1).astype(jnp.float32))
      return
    kernel = value(dense.kernel)            # dequantized when int8 (infer/quantize.py)
    n_in = math.prod(kernel.shape[:dense.n_in])
    kernel = kernel.reshape(n_in, -1).T
    if lanes:
      self.lanes, self.n_out = lanes, kernel.shape[0]
      self.panels = nnx.Param(panel_kernel.pack(kernel.astype(jnp.float32), lanes))
      return
    self.kernel = nnx.Param(kernel)

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    """x: [..., *in_shape] -> [..., *out_shape], as `Dense`."""
    lead = x.shape[:x.ndim - self.n_in]
    if self.int8_activations:
      import qwix
      kernel = qwix.QArray(qvalue=self.qvalue[...], scale=self.scale[...], zero_point=None,
                           qtype='int8')
      y = int8_rows_product(x.reshape(-1, kernel.qvalue.shape[1]), kernel, kernel_first=True)
      y = y.astype(dtype)
    elif self.lanes:
      panels = self.panels[...]
      rows = x.reshape(-1, panels.shape[1]).astype(jnp.float32)
      scale = self.scale[...] if panels.dtype == jnp.int8 else None
      y = panel_kernel.product(panels, rows, self.n_out, scale).astype(dtype)
    else:
      kernel = cast(self.kernel, dtype)
      y = out_first_product(kernel, x.reshape(-1, kernel.shape[1]).astype(dtype))
    y = y.reshape(lead + self.out_shape)
    if self.bias is not None:
      y = y + cast(self.bias, dtype)
    return y


@flax.struct.dataclass
class PerLayerCache:
  """The KV cache as per-layer arrays, for a `DecodeView`: as `llama.KVCache` (same mask, index,
  empty), with k, v tuples of one array per layer, [1, batch, heads, max_len, head_dim] (a
  `LayerCache` of one slab)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array
  empty: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def zeros(cls, cfg: LlamaConfig, batch: int, max_len: int,
            dtype=jnp.float32) -> 'PerLayerCache':
    shape = (1, batch, cfg.num_heads, max_len, cfg.head_dim)
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
               mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
               empty=True)

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]

  def grow(self, max_len: int) -> 'PerLayerCache':
    """The same cache with `max_len` slots; the new slots are empty (zeros, mask False)."""
    extra = llama_lib.added_slots(self.max_len, max_len)
    if extra == 0:
      return self
    return self.replace(k=tuple(llama_lib.pad_slots(a, extra, 3) for a in self.k),
                        v=tuple(llama_lib.pad_slots(a, extra, 3) for a in self.v),
                        mask=llama_lib.pad_slots(self.mask, extra, 1))

  def layer(self, i: int) -> LayerCache:
    return LayerCache(k=self.k[i], v=self.v[i], layer=0, index=self.index, empty=self.empty)


_DECODE_DENSE = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


class DecodeView(nnx.Module):
  """A `Llama` laid out for unrolled decoding: per-layer `DecoderLayer` modules whose projections
  are `OutFirstDense`, a re-laid `lm_head`; the embedding table and the final norm are the
  decoder's own (shared, not copied). Made once per weights (one copy of the decoder). `lanes`:
  the projections' kernels packed for `panel_kernel` (`generate.cpu_product = 'panels'`), and
  the layers' one-token attention with the cache taken by it too (`panel_kernel.cache_attention`),
  where the head size fits (`panel_kernel.cache_fits`)."""

  def __init__(self, llama: Llama, lanes: int = 0):
    self.cfg = llama.cfg
    self.compute_dtype = llama.compute_dtype
    self.embed_tokens = llama.embed_tokens
    self.norm = llama.norm
    graphdef, state = nnx.split(llama.layers)
    self.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                            for i in range(self.cfg.num_layers)])
    attends = panel_kernel.cache_fits(self.cfg.head_dim, lanes)
    for layer in self.layers:
      for name in _DECODE_DENSE:
        setattr(layer, name, OutFirstDense(getattr(layer, name), lanes))
      if attends:
        layer.cache_kernel = panel_kernel.cache_attention
    self.lm_head = OutFirstDense(llama.lm_head, lanes)

  embed = Llama.embed
  head = Llama.head

  def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               cache: PerLayerCache, *, last_only: bool = False, rope=None):
    """As `Llama.__call__`, the layers unrolled over a `PerLayerCache`."""
    mask = llama_lib.decoder_mask(attention_mask, cache)
    if rope is None:
      rope = llama_lib.rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
    x = constrain(embeds.astype(self.compute_dtype), ('act_batch', 'act_len', 'act_embed'))
    k, v = [], []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, rope, mask, cache.layer(i))
      k.append(layer_cache.k)
      v.append(layer_cache.v)
    cache = PerLayerCache(k=tuple(k), v=tuple(v),
                          mask=llama_lib.written_mask(cache, attention_mask),
                          index=cache.index + embeds.shape[1])
    return self.head(x, last_only), cache


# What a DecodeView owns (per-layer copies of the layers, the re-laid head); the embedding table
# and the final norm are the decoder's own.
_VIEW_OWNED = nnx.Any(nnx.PathContains('layers'), nnx.PathContains('lm_head'))
_VIEW_SHARED = nnx.Any(nnx.PathContains('embed_tokens'), nnx.PathContains('norm'))


def decode_view_shared(llama: Llama) -> nnx.State:
  """The decoder arrays a DecodeView shares with `llama` (embedding table, final norm)."""
  return nnx.state(llama, _VIEW_SHARED)


def merge_decode_view(graphdef, owned: nnx.State, shared: nnx.State) -> DecodeView:
  """The DecodeView from `decode_view_state`'s (graphdef, owned) and `decode_view_shared`."""
  return nnx.merge(graphdef, owned, shared)


@functools.lru_cache(maxsize=16)
def _compiled_view(llama_graphdef, lanes: int = 0):
  """(jitted llama state -> the DecodeView's own arrays, the list its graphdef is appended to)."""
  graphdefs = []

  def build(llama_state):
    view = DecodeView(nnx.merge(llama_graphdef, llama_state), lanes)
    graphdef, owned, _ = nnx.split(view, _VIEW_OWNED, ...)
    graphdefs.append(graphdef)
    return owned

  return jax.jit(build), graphdefs


class _ViewCache:
  """The last DecodeView made, with weak references to the decoder arrays it was made from.

  Re-laying the weights is a copy of the decoder (~0.1-0.2 s at the `bench` config, a fixed cost
  of every call); a model whose weights have not changed since the last call (same arrays) reuses
  it. New weights (a training step, a load) are new arrays, so the view is rebuilt. The view is
  kept alive between calls: the decoder's memory twice, as during a call
  (`generate_ids(..., reuse_decode_view=False)` or `clear_decode_view_cache()` frees it).
  """

  def __init__(self):
    self.key = None
    self.refs = ()
    self.graphdef = None
    self.owned = None

  def lookup(self, key, leaves):
    if (self.owned is not None and self.key == key and len(self.refs) == len(leaves)
        and all(ref() is leaf for ref, leaf in zip(self.refs, leaves))):
      owned, self.owned = self.owned, None     # donated to the decode call, handed back after
      return self.graphdef, owned
    return None

  def store(self, llama, graphdef, owned, lanes: int = 0):
    llama_graphdef, llama_state = nnx.split(llama)
    self.key, self.graphdef, self.owned = (llama_graphdef, lanes), graphdef, owned
    self.refs = tuple(weakref.ref(leaf) for leaf in jax.tree.leaves(llama_state))

  def clear(self):
    self.__init__()


_VIEW_CACHE = _ViewCache()


def clear_decode_view_cache():
  """Frees the re-laid decoder weights kept for the next `generate_ids` call."""
  _VIEW_CACHE.clear()


def decode_view_state(llama: Llama, reuse: bool = True, lanes: int = 0):
  """(graphdef, own arrays) of `DecodeView(llama, lanes)`, from the cache when the weights and
  `lanes` match (the arrays are then handed over: give them back with `keep_decode_view`)."""
  llama_graphdef, llama_state = nnx.split(llama)
  leaves = jax.tree.leaves(llama_state)
  if reuse:
    hit = _VIEW_CACHE.lookup((llama_graphdef, lanes), leaves)
    if hit is not None:
      return hit
  build, graphdefs = _compiled_view(llama_graphdef, lanes)
  owned = build(llama_state)
  return graphdefs[-1], owned


def keep_decode_view(llama: Llama, graphdef, owned, lanes: int = 0):
  """Keeps the view's arrays (as a decode call hands them back) for the next call on `llama`."""
  _VIEW_CACHE.store(llama, graphdef, owned, lanes)


__all__ = ['COMPILER_OPTIONS', 'DecodeView', 'FEATURE_MAJOR_MAX_ROWS', 'OutFirstDense',
           'PerLayerCache', 'clear_decode_view_cache', 'decode_view_shared', 'decode_view_state',
           'feature_major_product', 'keep_decode_view', 'merge_decode_view', 'out_first_product']
