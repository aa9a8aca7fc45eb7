"""Shared blocks: dense projections, norms, attention and dropout, with logical axis names.

Every parameter is created through `param(...)`, which attaches its logical axis names; the mesh
placement comes from the rule table in `radfm_jax/sharding.py`. Parameters are stored in
`param_dtype` and cast to the compute dtype at use.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from radfm_jax.sharding import constrain

REMAT_POLICIES = {
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'everything_saveable': jax.checkpoint_policies.everything_saveable,
}


def torch_linear_init(fan_in: int):
  """torch.nn.Linear's default init (uniform +-1/sqrt(fan_in)), so fresh towers match the original."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """An `nnx.Param` of `shape` carrying logical axis names `axes` (one per dimension)."""
  assert len(shape) == len(axes), (shape, axes)
  value = init(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, out_sharding=tuple(axes))


def quantized(p: nnx.Param) -> bool:
  """Whether Qwix post-training quantization replaced this kernel (infer/quantize.py: a
  WithAux(QArray) of int8 values + scales)."""
  return hasattr(p, 'how')


def value(p: nnx.Param) -> jax.Array:
  """The parameter's array. A `quantized` kernel is dequantized here, at its use, so the stored
  weights stay int8 and every path (scan, unrolled decode) computes with the same values (in the
  scales' dtype)."""
  if quantized(p):
    import qwix
    return qwix.dequantize(_qarray(p))
  return p[...]


def _qarray(p: nnx.Param):
  """The Qwix `QArray` of a quantized kernel, its values and scales as plain arrays."""
  is_var = lambda x: isinstance(x, nnx.Variable)   # noqa: E731
  return jax.tree.map(lambda x: x[...] if is_var(x) else x, p.array, is_leaf=is_var)


def cast(p: nnx.Param, dtype) -> jax.Array:
  return value(p).astype(dtype)


def int8_kernel(p: nnx.Param, n_in: int):
  """A Qwix-quantized kernel [*in_shape, *out_shape] (infer/quantize.py) as a 2D `qwix.QArray`
  [in, out]: its int8 values and its one scale per output channel, [1, out]."""
  import qwix
  q = _qarray(p)
  in_size = math.prod(q.qvalue.shape[:n_in])
  return qwix.QArray(qvalue=q.qvalue.reshape(in_size, -1), scale=q.scale.reshape(1, -1),
                     zero_point=None, qtype=q.qtype)


def int8_rows_product(rows: jax.Array, kernel, *, kernel_first: bool = False) -> jax.Array:
  """rows [n, in] (float) x an int8 kernel -> [n, out] float32: `quantize='w8a8'`.

  Each row is quantized on the fly to symmetric int8 with its own absmax scale (a token's
  activations, `qwix.quantize` per row), the product runs int8 x int8 -> int32 and is dequantized
  at the output by both scales (`qwix.dot_general`'s fast path). kernel: a `qwix.QArray` [in, out]
  (`int8_kernel`), or [out, in] with `kernel_first` (the decode view's layout, whose product
  kernel @ rows^T XLA:CPU runs fastest for few rows). A single row is computed as two equal rows:
  XLA:CPU has no fast int8 matrix-vector product (~110 ms against 2.5-3.2 ms for 2-8 rows at the
  `bench` decoder, docs/performance.md).
  """
  import qwix
  n = rows.shape[0]
  if n == 1:
    rows = jnp.concatenate([rows, rows])
  q = qwix.quantize(rows.astype(jnp.float32), 'int8', channelwise_axes=(0,))
  if kernel_first:
    y = qwix.dot_general(kernel, q, (((1,), (1,)), ((), ()))).T
  else:
    y = qwix.dot_general(q, kernel, (((1,), (0,)), ((), ())))
  return y[:n]


@jax.custom_vjp
def transposed_backward_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [.., in] . kernel [in, out] -> [.., out], the product `Dense` computes, whose backward
  writes the input out transposed for the kernel gradient (`model.dense_backward =
  'transposed'`, the `cpu` preset).

  Why: JAX's transpose rule gives the kernel gradient as x^T . dy, a contraction over the rows,
  the major dimension of both operands. XLA:CPU runs it as an Eigen dot for which it first writes
  dy transposed, [out, rows], fused into the elementwise op that produced dy (the SiLU-gate
  backward of a decoder layer, say): a strided write, and the dot's own operand order the slow
  one. With x^T written out first (a copy of the layer input, [in, rows], optimization barrier so
  that XLA's simplifier cannot fold it back into the dot's dimension numbers) the product is a
  plain row-major one that XLA hands to YNNPACK: the `bench` step 10-23% faster on an AVX2 EPYC
  (three runs of benchmarks/train_step.py, docs/performance.md). The input gradient dy . kernel^T stays as JAX writes it: writing the
  kernel out transposed too (a copy of every kernel per step) gained nothing on the whole step.
  """
  return _flat_product(x, kernel)


def _flat_product(x, kernel):
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _transposed_backward_fwd(x, kernel):
  return _flat_product(x, kernel), (x, kernel)


def _transposed_backward_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  rows = x.reshape(-1, x.shape[-1])
  dkernel = jax.lax.optimization_barrier(rows.T) @ dy.reshape(-1, dy.shape[-1])
  return dx, dkernel


transposed_backward_product.defvjp(_transposed_backward_fwd, _transposed_backward_bwd)


class Dense(nnx.Module):
  """y = x . kernel (+ bias), contracting the last `len(in_shape)` dims of x.

  kernel: [*in_shape, *out_shape] with logical names `in_axes + out_axes`; bias: [*out_shape].

  The product is one 2D matmul [.., prod(in_shape)] x [prod(in_shape), prod(out_shape)] (both
  reshapes are free in the row-major layout the parameters are stored in), the same sums as the
  multi-dimensional dot_general. Why: given the attention kernels as [embed, heads, head_dim],
  the TPU compiler lays a layer's slice out with `embed` minor; for a stacked (scanned) kernel
  that is not gathered per layer (one chip, no FSDP) the layout reaches the whole stack, which is
  then copied once, transposed: 3 x 1.95 GiB for the 13B q/k/v, the difference between LoRA on
  one v6e chip refused (31.83 GiB) and fitting (26.12 GiB), docs/performance.md.
  `flat_matmul=False` keeps the multi-dimensional form: QLoRA (models/lora.py) sets it, since
  Qwix quantizes the kernel it finds in the dot and keeps its logical axes, one per dimension.
  `dense_backward` (config `model.dense_backward`, set on every Dense by `RadFM`): 'transposed'
  computes the flat product as `transposed_backward_product`.
  """

  def __init__(self, in_shape, out_shape, in_axes, out_axes, *, use_bias: bool, rngs: nnx.Rngs,
               param_dtype=jnp.float32, kernel_init=None, bias_init=None):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    fan_in = math.prod(in_shape)
    kernel_init = kernel_init or torch_linear_init(fan_in)
    self.n_in = len(in_shape)
    self.out_shape = out_shape
    self.flat_matmul = True
    self.dense_backward = 'autodiff'
    self.kernel = param(rngs, kernel_init, in_shape + out_shape, tuple(in_axes) + tuple(out_axes),
                        param_dtype)
    if use_bias:
      self.bias = param(rngs, bias_init or torch_linear_init(fan_in), out_shape, tuple(out_axes),
                        param_dtype)
    else:
      self.bias = None

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    if getattr(self, 'int8_activations', False):
      # `quantize='w8a8'` (infer/quantize.py): int8 activations x int8 kernel, int32 sums
      batch_shape = x.shape[:x.ndim - self.n_in]
      kernel = int8_kernel(self.kernel, self.n_in)
      y = int8_rows_product(x.reshape(-1, kernel.qvalue.shape[0]), kernel)
      y = y.astype(dtype).reshape(batch_shape + self.out_shape)
      return y if self.bias is None else y + cast(self.bias, dtype)
    if getattr(self, 'dequantize_at_use', False):
      # post-training quantized (infer/quantize.py): int8 kept, dequantized here (`value`), so
      # paths outside the model's __call__ (the decoder in generation) compute the same values
      x, kernel = x.astype(dtype), cast(self.kernel, dtype)
    else:
      # flax's promote_dtype rather than .astype: Qwix (LoRA / QLoRA, models/lora.py) intercepts
      # it inside the model's __call__ and leaves a quantized base kernel (WithAux) as it is.
      x, kernel = promote_dtype((x, self.kernel[...]), dtype=dtype)
    batch_shape = x.shape[:x.ndim - self.n_in]
    if self.flat_matmul:
      in_size = math.prod(kernel.shape[:self.n_in])
      product = (transposed_backward_product if self.dense_backward == 'transposed'
                 else _flat_product)
      y = product(x.reshape(batch_shape + (in_size,)),
                  kernel.reshape(in_size, math.prod(self.out_shape)))
      y = y.reshape(batch_shape + self.out_shape)
    else:
      y = jax.lax.dot_general(x, kernel, ((tuple(range(len(batch_shape), x.ndim)),
                                           tuple(range(self.n_in))), ((), ())))
    if self.bias is not None:
      y = y + cast(self.bias, dtype)
    return y


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm semantics (biased variance, eps 1e-5 by default), statistics in fp32."""

  def __init__(self, dim: int, axis_name: str, *, rngs: nnx.Rngs, eps: float = 1e-5,
               param_dtype=jnp.float32):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), (axis_name,), param_dtype)

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(dtype)


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm as in HF: mean of squares in fp32, y = w * (x * rsqrt(ms + eps)) in x's dtype."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ('norm',), param_dtype)

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return cast(self.scale, dtype) * y.astype(dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
  """torch.nn.GELU() default: the erf form (jax.nn.gelu defaults to the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `rng` is None (eval) or the rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
              implementation: str = 'xla', dropout_rate: float = 0.0,
              dropout_rng: jax.Array | None = None) -> jax.Array:
  """Softmax attention, scores scaled by head_dim**-0.5, softmax in fp32.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim];
  mask: bool broadcastable to [batch, heads, q_len, kv_len] (True = attend).
  Returns [batch, q_len, heads, head_dim].
  """
  if implementation == 'splash':
    # Splash (TPU Pallas) is the decoder's causal kernel, the one caller passing a mask; the vision
    # tower and the resampler (no mask, not causal) keep XLA's attention.
    if mask is not None:
      from radfm_jax.models import splash
      return splash.causal_attention(q, k, v, mask)
    implementation = 'xla'
  if dropout_rng is None or dropout_rate == 0.0:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  # Dropout on the attention probabilities (ViT training) needs the explicit form.
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * (q.shape[-1] ** -0.5)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = dropout(probs, dropout_rate, dropout_rng).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array,
                     cache_v: jax.Array, cached_mask: jax.Array, new_mask: jax.Array, *,
                     cache_kernel=None, written: jax.Array | None = None) -> jax.Array:
  """Attention of new tokens to a KV cache (llama.LayerCache layout, no per-step transpose of it)
  and to each other; the new keys / values are not in the cache yet.

  q, k, v: the new tokens, [batch, len, heads, head_dim]; cache_k, cache_v: [batch, heads,
  max_len, head_dim]; cached_mask: bool broadcastable to
  [batch, heads, len, max_len]; new_mask: bool broadcastable to [batch, heads, len, len]. One
  softmax (fp32) over both key sets, masked entries at the dtype minimum (as HF does).
  cache_kernel: None, or a function that computes a one-token step's whole attention
  (`cache_kernel(q, k, v [b, n, h], cache_k, cache_v, cached [b, max_len], own [b], written,
  scale) -> [b, n, h]`) reading only the first `written` slots (int32 scalar; cached_mask must
  mask the later ones), taken where the masks are the same for every head: the CPU decode's
  kernel (`panel_kernel.cache_attention`), which splits it over the threads.
  Returns [batch, len, heads, head_dim].
  """
  scale = q.shape[-1] ** -0.5
  neg = jnp.finfo(jnp.float32).min
  one = q.shape[1] == 1
  if (one and cache_kernel is not None and written is not None
      and q.dtype == k.dtype == v.dtype == cache_k.dtype == cache_v.dtype == jnp.float32
      and cached_mask.ndim == new_mask.ndim == 4
      and cached_mask.shape[1:3] == new_mask.shape[1:3] == (1, 1)):
    batch, max_len = q.shape[0], cache_k.shape[-2]
    cached = jnp.broadcast_to(cached_mask[:, 0, 0, :], (batch, max_len))
    own = jnp.broadcast_to(new_mask[:, 0, 0, 0], (batch,))
    return cache_kernel(q[:, 0], k[:, 0], v[:, 0], cache_k, cache_v, cached, own, written,
                        scale)[:, None]
  if one:
    # One new token (a decode step): the cache times a vector. Written as the general form,
    # XLA:CPU copies every layer's cached keys into [heads, head_dim, slots] order at every
    # batch-1 step first (3x the time of this form; docs/performance.md).
    cached = jnp.einsum('bnkh,bnh->bnk', cache_k, q[:, 0],
                        preferred_element_type=jnp.float32)[:, :, None, :]
  else:
    cached = jnp.einsum('bqnh,bnkh->bnqk', q, cache_k, preferred_element_type=jnp.float32)
  new = jnp.einsum('bqnh,bknh->bnqk', q, k, preferred_element_type=jnp.float32)
  scores = jnp.concatenate([jnp.where(cached_mask, cached * scale, neg),
                            jnp.where(new_mask, new * scale, neg)], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  max_len = cache_k.shape[-2]
  from_cache = jnp.einsum('bnqk,bnkh->bqnh', probs[..., :max_len], cache_v)
  return from_cache + jnp.einsum('bnqk,bknh->bqnh', probs[..., max_len:], v)


def first_argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, axis=-1)` as int32, the same index (the first maximum; the first NaN when
  there is one), as two plain reductions: the maximum, then the smallest index that holds it.
  XLA:CPU compiles argmax's (value, index) pair reduction to scalar code; the two reductions
  vectorize: a decode step's `[8, 32000]` logits 0.59 -> 0.15 ms, 1 to 128 rows 3.2-4.1x faster
  (docs/performance.md). Not for a training step's `[512, 32000]`: there XLA:CPU splits argmax
  over both threads and it measured 36 against 60 ms, so the train step keeps `jnp.argmax`."""
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where((x == top) | jnp.isnan(x), index, x.shape[-1]), axis=-1)


def layer_rngs(rng: jax.Array | None, num_layers: int):
  """Per-layer dropout keys as a scanned input ([layers, 2] or None)."""
  return None if rng is None else jax.random.split(rng, num_layers)


def run_layers(body, carry, layers, xs, *, remat_policy: str, length: int, scan: bool = True):
  """Runs `body(carry, layer, x) -> (carry, y)` over stacked `layers` (+ remat), returning
  (carry, ys stacked on a leading layer axis).

  `layers` is a module whose parameters have a leading `layers` axis; `xs` is a pytree of per-layer
  inputs (leading axis = layer), or None. With `scan` (config `model.scan_layers`) one `nnx.scan`
  body is compiled for all layers; without, a Python loop runs each layer on its slice of the same
  stacked parameters (larger programs, no per-step slicing of the weights inside a loop; the
  parameter tree, hence checkpoints, are the same).
  """
  fn = body
  if remat_policy != 'none':
    fn = nnx.remat(fn, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  if scan:
    scanned = nnx.scan(fn, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), length=length,
                       transform_metadata={nnx.PARTITION_NAME: 'layers'})
    return scanned(carry, layers, xs)
  graphdef, state = nnx.split(layers)
  ys = []
  for i in range(length):
    layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
    carry, y = fn(carry, layer, jax.tree.map(lambda a, i=i: a[i], xs))
    ys.append(y)
  return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def stacked(make_layer, num_layers: int, rngs: nnx.Rngs):
  """Creates `num_layers` copies of `make_layer(rngs)` stacked on a leading `layers` axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(rngs):
    return make_layer(rngs)

  return make(rngs)


__all__ = ['Dense', 'LayerNorm', 'RMSNorm', 'attention', 'constrain', 'dropout', 'first_argmax',
           'gelu_exact', 'layer_rngs', 'param', 'run_layers', 'stacked', 'value']
