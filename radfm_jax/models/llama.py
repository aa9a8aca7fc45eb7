"""LLaMA decoder (docs/original.md section 6, HF transformers 4.28.1 semantics) with a KV cache.

Pre-norm blocks, RMSNorm (eps 1e-6, statistics in fp32), rotate-half RoPE over the full head dim
(HF weight layout: pairs (i, i + head_dim/2)), SwiGLU MLP, no biases, untied `lm_head`. Layers are
stacked on a leading `layers` axis and run with `nnx.scan` (+ remat from the config).

The KV cache is a plain pytree (`KVCache`) passed in and returned, so prefill and decode are pure
functions that `jax.jit` compiles once per shape.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from radfm_jax.config import LlamaConfig
from radfm_jax.models import layers
from radfm_jax.models.layers import Dense, RMSNorm, constrain


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer for `max_len` slots.

  k, v: keys and values, [layers, batch, heads, max_len, head_dim] each (a new token's key is one
  contiguous row per head; with keys stored transposed, [.., head_dim, max_len], a batch-8 `bench`
  decode step on XLA:CPU measured 0.3-0.8 ms slower). With
  `per_layer`, k and v are tuples of per-layer arrays (the unrolled decode path: slicing a slab out
  of a stacked array copies it at every step). mask: bool [batch, max_len], True where a slot holds
  a real (non-padding) token; index: int32 scalar, the next slot to write; empty (static): nothing
  written yet, so a prefill skips attending to the cache (all of it masked, and constant-folding
  attention over the zero cache costs XLA seconds of compile time).
  """
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array
  empty: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def zeros(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32, *,
            per_layer: bool = False) -> 'KVCache':
    shape = (batch, cfg.num_heads, max_len, cfg.head_dim)
    if per_layer:
      k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
      v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    else:
      k = jnp.zeros((cfg.num_layers,) + shape, dtype)
      v = jnp.zeros((cfg.num_layers,) + shape, dtype)
    return cls(k=k, v=v, mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
               empty=True)

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]

  def grow(self, max_len: int) -> 'KVCache':
    """The same cache with `max_len` slots; the new slots are empty (zeros, mask False)."""
    extra = max_len - self.max_len
    if extra == 0:
      return self
    if extra < 0:
      raise ValueError(f'cannot shrink a KV cache of {self.max_len} slots to {max_len}')

    def pad(a, axis):
      widths = [(0, 0)] * a.ndim
      widths[axis] = (0, extra)
      return jnp.pad(a, widths)

    # Slots are the second-to-last axis of k and v, stacked or per layer.
    k, v = (jax.tree.map(lambda a: pad(a, a.ndim - 2), t) for t in (self.k, self.v))
    return KVCache(k=k, v=v, mask=pad(self.mask, 1), index=self.index, empty=self.empty)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos, sin: [batch, len, 1, head_dim] for rotate-half RoPE; angles concat(freqs, freqs)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [batch, len, heads, head_dim]; rotate_half(x) = concat(-x2, x1)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    e, h, hd, m = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    kw = dict(rngs=rngs, param_dtype=param_dtype, use_bias=False,
              kernel_init=jax.nn.initializers.normal(0.02))
    self.input_norm = RMSNorm(e, rngs=rngs, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.q = Dense((e,), (h, hd), ('embed',), ('heads', 'kv'), **kw)
    self.k = Dense((e,), (h, hd), ('embed',), ('heads', 'kv'), **kw)
    self.v = Dense((e,), (h, hd), ('embed',), ('heads', 'kv'), **kw)
    self.o = Dense((h, hd), (e,), ('heads', 'kv'), ('embed',), **kw)
    self.post_attention_norm = RMSNorm(e, rngs=rngs, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.gate = Dense((e,), (m,), ('embed',), ('mlp',), **kw)
    self.up = Dense((e,), (m,), ('embed',), ('mlp',), **kw)
    self.down = Dense((m,), (e,), ('mlp',), ('embed',), **kw)

  def __call__(self, x, rope, mask, cache, cache_index, layer_index, *, dtype, attention_impl: str):
    """x: [batch, len, embed]; cache: None, or (k, v) in the KVCache layout: the stacked arrays,
    of which this layer owns slab `layer_index`, or with `layer_index` None this layer's own
    arrays. mask: without a cache bool [batch, 1, len, len]; with one (cached_mask
    [batch, 1, 1 or len, max_len] or None for an empty cache, new_mask [batch, 1, len, len]) as
    in cached_attention.
    Returns (x, updated cache or None)."""
    cos, sin = rope
    h = self.input_norm(x, dtype)
    q = apply_rope(self.q(h, dtype), cos, sin)
    k = apply_rope(self.k(h, dtype), cos, sin)
    v = self.v(h, dtype)
    q = constrain(q, ('act_batch', 'act_len', 'act_heads', 'act_kv'))
    if cache is None:
      y = layers.attention(q, k, v, mask, implementation=attention_impl)
    else:
      # Attend to the cached slots and the new tokens, then write the new keys / values: the
      # write is then the cache's last use and happens in place (updating first and attending to
      # the result makes XLA:CPU copy the cache at every step).
      cache_k, cache_v = cache
      if layer_index is None:        # this layer's own arrays (KVCache per_layer)
        old_k, old_v = cache_k, cache_v
      else:                          # slab `layer_index` of the stacked arrays
        old_k = jax.lax.dynamic_index_in_dim(cache_k, layer_index, keepdims=False)
        old_v = jax.lax.dynamic_index_in_dim(cache_v, layer_index, keepdims=False)
      cached_mask, new_mask = mask
      if cached_mask is None:        # empty cache: the new tokens only
        y = layers.attention(q, k, v, new_mask, implementation=attention_impl)
      else:
        y = layers.cached_attention(q, k, v, old_k.astype(dtype), old_v.astype(dtype),
                                    cached_mask, new_mask)

      def write(cached, new):
        new = new.swapaxes(1, 2).astype(cached.dtype)  # [batch, heads, len, head_dim]
        if layer_index is None:
          return jax.lax.dynamic_update_slice(cached, new, (0, 0, cache_index, 0))
        return jax.lax.dynamic_update_slice(cached, new[None], (layer_index, 0, 0, cache_index, 0))

      cache = (write(cache_k, k), write(cache_v, v))
    x = x + self.o(y, dtype)
    h = self.post_attention_norm(x, dtype)
    y = self.down(jax.nn.silu(self.gate(h, dtype)) * self.up(h, dtype), dtype)
    x = constrain(x + y, ('act_batch', 'act_len', 'act_embed'))
    return x, cache


class Llama(nnx.Module):
  """LlamaForCausalLM: `embed_tokens`, stacked `layers`, final `norm`, untied `lm_head`."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, remat_policy: str = 'none', attention_impl: str = 'xla'):
    self.cfg = cfg
    self.compute_dtype = compute_dtype
    self.remat_policy = remat_policy
    self.attention_impl = attention_impl
    self.embed_tokens = layers.param(rngs, jax.nn.initializers.normal(0.02),
                                     (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'),
                                     param_dtype)
    self.layers = layers.stacked(lambda r: DecoderLayer(cfg, rngs=r, param_dtype=param_dtype),
                                 cfg.num_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, rngs=rngs, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = Dense((cfg.hidden_size,), (cfg.vocab_size,), ('embed',), ('vocab',),
                         use_bias=False, rngs=rngs, param_dtype=param_dtype,
                         kernel_init=jax.nn.initializers.normal(0.02))

  def decode_view(self) -> 'DecodeView':
    """This decoder with its weights re-laid for unrolled decoding (see `DecodeView`)."""
    return DecodeView(self)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[batch, len] ids < vocab_size -> [batch, len, embed] (compute dtype)."""
    return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.compute_dtype)

  def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               cache: KVCache | None = None, *, last_only: bool = False):
    """embeds: [batch, len, embed]; positions: int [batch, len]; attention_mask: [batch, len]
    (1 = real token). With `cache` (stacked), the tokens fill slots
    [cache.index, cache.index + len).

    Returns (logits float32 [batch, len, vocab], or [batch, 1, vocab] for the last position only
    with `last_only` (a prefill needs no more: the head is the largest matmul), updated cache or
    None).
    """
    return _decoder_forward(self, embeds, positions, attention_mask, cache, unrolled=False,
                            last_only=last_only)


def _decoder_forward(decoder, embeds, positions, attention_mask, cache, *, unrolled: bool,
                     last_only: bool = False):
  """The forward of `Llama` (stacked layers, scanned) and of `DecodeView` (`unrolled` over its
  per-layer modules and a per-layer cache): masks, RoPE, the layers, final norm and head."""
  cfg, dtype = decoder.cfg, decoder.compute_dtype
  length = embeds.shape[1]
  token_mask = attention_mask.astype(bool)
  causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
  # Causal + key padding, [batch, 1, len, len].
  mask = causal & token_mask[:, None, None, :]
  if cache is not None:
    index = cache.index
    slot = jnp.arange(cache.mask.shape[1])
    # Cached slots every new token sees: written before `index` and not padding.
    cached_mask = (None if cache.empty
                   else ((slot < index)[None, :] & cache.mask)[:, None, None, :])
    mask = (cached_mask, mask)
    key_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, index))
  rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
  x = constrain(embeds.astype(dtype), ('act_batch', 'act_len', 'act_embed'))

  if cache is None:
    def body(x, layer, _):
      return layer(x, rope, mask, None, 0, 0, dtype=dtype,
                   attention_impl=decoder.attention_impl)[0], None

    x, _ = layers.scan_layers(body, x, decoder.layers, None, remat_policy=decoder.remat_policy,
                              length=cfg.num_layers)
  elif unrolled:
    cache_k, cache_v = list(cache.k), list(cache.v)
    for i, layer in enumerate(decoder.layers):
      x, (cache_k[i], cache_v[i]) = layer(x, rope, mask, (cache_k[i], cache_v[i]), index, None,
                                          dtype=dtype, attention_impl=decoder.attention_impl)
    cache_k, cache_v = tuple(cache_k), tuple(cache_v)
  else:
    # The whole cache rides in the scan carry and each layer updates its slab in place; as a
    # scanned input/output it would be copied whole at every decode step.
    def body(carry, layer, i):
      x, kv = carry
      x, kv = layer(x, rope, mask, kv, index, i, dtype=dtype,
                    attention_impl=decoder.attention_impl)
      return (x, kv), None

    (x, (cache_k, cache_v)), _ = layers.scan_layers(
        body, (x, (cache.k, cache.v)), decoder.layers, jnp.arange(cfg.num_layers),
        remat_policy='none', length=cfg.num_layers)
  if last_only:
    x = x[:, -1:]
  logits = decoder.lm_head(decoder.norm(x, dtype), dtype).astype(jnp.float32)
  logits = constrain(logits, ('act_batch', 'act_len', 'act_vocab'))
  if cache is not None:
    cache = KVCache(k=cache_k, v=cache_v, mask=key_mask, index=index + length)
  return logits, cache


_DECODE_DENSE = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


class DecodeView(nnx.Module):
  """Per-layer decoder weights for unrolled decoding (`generate.layer_loop = 'unrolled'`).

  Two layout changes, made once per `generate` call (one copy of the decoder weights), that
  XLA:CPU needs for fast single-token steps (measured in benchmarks/generate.py):
  - the stacked layers become `num_layers` separate modules: a scan (or a static index) slices each
    layer's weights out of the stacked arrays at every step, a copy of the whole decoder per token;
  - every matmul kernel is stored output-first as a matrix [out, in] (`Dense.kernel_out_first`):
    XLA:CPU multiplies [batch, in] by an [out, in] matrix up to ~1.8x faster than by [in, out].
  Values are never changed, only laid out.
  """

  def __init__(self, llama: Llama):
    self.cfg = llama.cfg
    self.compute_dtype = llama.compute_dtype
    self.attention_impl = llama.attention_impl
    # Shared with the decoder (not copied): the embedding table and the final norm.
    self.embed_tokens = llama.embed_tokens
    self.norm = llama.norm
    graphdef, state = nnx.split(llama.layers)
    self.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                            for i in range(self.cfg.num_layers)])
    head_graphdef, head_state = nnx.split(llama.lm_head)
    self.lm_head = nnx.merge(head_graphdef, jax.tree.map(lambda a: a, head_state))  # a copy
    for layer in self.layers:
      for name in _DECODE_DENSE:
        getattr(layer, name).lay_out_first()
    self.lm_head.lay_out_first()

  embed = Llama.embed

  def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               cache: KVCache, *, last_only: bool = False):
    """As `Llama.__call__`, with a per-layer cache (`KVCache.zeros(..., per_layer=True)`)."""
    return _decoder_forward(self, embeds, positions, attention_mask, cache, unrolled=True,
                            last_only=last_only)


# What a DecodeView owns (per-layer copies of the layers, the re-laid head); the embedding table
# and the final norm are the decoder's own.
_VIEW_OWNED = nnx.Any(nnx.PathContains('layers'), nnx.PathContains('lm_head'))
_VIEW_SHARED = nnx.Any(nnx.PathContains('embed_tokens'), nnx.PathContains('norm'))


def split_decode_view(view: DecodeView):
  """(graphdef, the view's own arrays as an nnx.State), for `merge_decode_view`."""
  graphdef, owned, _ = nnx.split(view, _VIEW_OWNED, ...)
  return graphdef, owned


def decode_view_shared(llama: Llama) -> nnx.State:
  """The decoder arrays a DecodeView shares with `llama` (embedding table, final norm)."""
  return nnx.state(llama, _VIEW_SHARED)


def merge_decode_view(graphdef, owned: nnx.State, shared: nnx.State) -> DecodeView:
  return nnx.merge(graphdef, owned, shared)
