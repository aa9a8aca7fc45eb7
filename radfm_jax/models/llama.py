"""LLaMA decoder (docs/original.md section 6, HF transformers 4.28.1 semantics) with a KV cache.

Pre-norm blocks, RMSNorm (eps 1e-6, statistics in fp32), rotate-half RoPE over the full head dim
(HF weight layout: pairs (i, i + head_dim/2)), SwiGLU MLP, no biases, untied `lm_head`. Layers are
stacked on a leading `layers` axis and run with `nnx.scan` (+ remat from the config), or a Python
loop over the same stacked parameters (`scan_layers=False`).

    rope = rope_tables(positions, head_dim, theta)               # once per forward
    x, layer_cache = layer(x, rope, mask, layer_cache)          # one DecoderLayer

The KV cache is a plain pytree (`KVCache`) passed in and returned, so prefill and decode are pure
functions that `jax.jit` compiles once per shape; each layer reads and writes its part through a
`LayerCache`. The decode loop is `radfm_jax/infer/generate.py`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from radfm_jax.config import LlamaConfig
from radfm_jax.models import layers
from radfm_jax.models.layers import Dense, RMSNorm, constrain


def pad_slots(a: jax.Array, extra: int, axis: int) -> jax.Array:
  """`a` with `extra` zero (False) slots appended along `axis` (growing a cache)."""
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def added_slots(max_len: int, new_max_len: int) -> int:
  """How many slots growing a cache of `max_len` slots to `new_max_len` adds (never negative)."""
  if new_max_len < max_len:
    raise ValueError(f'cannot shrink a KV cache of {max_len} slots to {new_max_len}')
  return new_max_len - max_len


@flax.struct.dataclass
class LayerCache:
  """One decoder layer's part of a KV cache, as `DecoderLayer` reads and writes it.

  k, v: [n, batch, heads, max_len, head_dim], of which this layer's keys / values are slab
  `layer` (int32 scalar or int): a KVCache's stacked arrays (a scan carries them whole, and the
  layer writes its new tokens into them in place; a scanned slab would be copied whole at every
  step), or one layer's own arrays with n = 1 (infer/cpu_decode.py). index: int32 scalar, the slot
  of the first new token; empty (static): nothing written yet, so a prefill skips attending to the
  cache (all of it masked, and constant-folding attention over the zero cache costs XLA seconds
  of compile time).
  """
  k: jax.Array
  v: jax.Array
  layer: jax.Array | int
  index: jax.Array
  empty: bool = flax.struct.field(pytree_node=False, default=False)

  def read(self) -> tuple[jax.Array, jax.Array]:
    """This layer's keys and values, [batch, heads, max_len, head_dim] each."""
    return (jax.lax.dynamic_index_in_dim(self.k, self.layer, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.v, self.layer, keepdims=False))

  def write(self, k: jax.Array, v: jax.Array) -> 'LayerCache':
    """The cache with new keys / values k, v [batch, len, heads, head_dim] in slots
    [index, index + len)."""

    def put(cached, new):
      new = new.swapaxes(1, 2).astype(cached.dtype)[None]  # [1, batch, heads, len, head_dim]
      return jax.lax.dynamic_update_slice(cached, new, (self.layer, 0, 0, self.index, 0))

    return self.replace(k=put(self.k, k), v=put(self.v, v))


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer for `max_len` slots.

  k, v: keys and values, [layers, batch, heads, max_len, head_dim] each (a new token's key is one
  contiguous row per head; with keys stored transposed, [.., head_dim, max_len], a batch-8 `bench`
  decode step on XLA:CPU measured 0.3-0.8 ms slower). mask: bool [batch, max_len], True where a
  slot holds a real (non-padding) token; index: int32 scalar, the next slot to write; empty
  (static): nothing written yet (see `LayerCache`).
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array
  empty: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def zeros(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> 'KVCache':
    shape = (cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
               empty=True)

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]

  def grow(self, max_len: int) -> 'KVCache':
    """The same cache with `max_len` slots; the new slots are empty (zeros, mask False)."""
    extra = added_slots(self.max_len, max_len)
    if extra == 0:
      return self
    return self.replace(k=pad_slots(self.k, extra, 3), v=pad_slots(self.v, extra, 3),
                        mask=pad_slots(self.mask, extra, 1))

  def layer(self, i) -> LayerCache:
    return LayerCache(k=self.k, v=self.v, layer=i, index=self.index, empty=self.empty)


def decoder_mask(attention_mask: jax.Array, cache=None) -> jax.Array:
  """The decoder's attention mask, bool [batch, 1, len, keys] (True = attend).

  attention_mask: [batch, len] (1 = real token); cache: None, or a cache with `mask`, `index` and
  `empty` (KVCache, cpu_decode.PerLayerCache). The keys are the new tokens (causal, key padding)
  and, with a cache, its max_len slots before them: those written before `index` that hold a real
  token.
  """
  length = attention_mask.shape[1]
  token_mask = attention_mask.astype(bool)
  causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
  mask = causal & token_mask[:, None, None, :]
  if cache is None:
    return mask
  slot = jnp.arange(cache.max_len)
  cached = (slot < cache.index)[None, :] & cache.mask
  cached = jnp.broadcast_to(cached[:, None, None, :], mask.shape[:3] + (cache.max_len,))
  return jnp.concatenate([cached, mask], axis=-1)


def written_mask(cache, attention_mask: jax.Array) -> jax.Array:
  """cache.mask after the tokens of `attention_mask` [batch, len] fill slots from cache.index."""
  return jax.lax.dynamic_update_slice(cache.mask, attention_mask.astype(bool), (0, cache.index))


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos, sin: [batch, len, 1, head_dim] for rotate-half RoPE; angles concat(freqs, freqs).

  Computed once per forward and handed to every layer: computed inside a layer, XLA:CPU fuses
  the sine and cosine into each head's rotation, i.e. evaluates them heads x 2 times per layer
  (a batch-8 decode step of the `bench` decoder: 0.2-0.3 ms, docs/performance.md)."""
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

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, attention_impl: str = 'xla'):
    e, h, hd, m = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    self.compute_dtype = compute_dtype
    self.attention_impl = attention_impl
    # A one-token step's attention with the cache (`layers.cached_attention`): None, XLA's; the
    # CPU decode view sets its kernel's (infer/cpu_decode.py).
    self.cache_kernel = None
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

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array,
               cache: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
    """x: [batch, len, embed]; rope: `rope_tables` (cos, sin) of the tokens' positions; mask:
    `decoder_mask`, bool [batch, 1, len, keys], keys = the cache's max_len slots (with a cache)
    then the new tokens; cache: this layer's LayerCache or None. Returns (x, the cache with the
    new keys / values)."""
    dtype = self.compute_dtype
    cos, sin = rope
    h = self.input_norm(x, dtype)
    q = apply_rope(self.q(h, dtype), cos, sin)
    k = apply_rope(self.k(h, dtype), cos, sin)
    v = self.v(h, dtype)
    q = constrain(q, ('act_batch', 'act_len', 'act_heads', 'act_kv'))
    if cache is None:
      y = layers.attention(q, k, v, mask, implementation=self.attention_impl)
    else:
      # Attend to the cached slots and the new tokens, then write the new keys / values: the
      # write is then the cache's last use and happens in place (updating first and attending to
      # the result makes XLA:CPU copy the cache at every step).
      max_len = mask.shape[-1] - x.shape[1]
      new_mask = mask[..., max_len:]
      if cache.empty:                 # the new tokens only
        y = layers.attention(q, k, v, new_mask, implementation=self.attention_impl)
      else:
        old_k, old_v = cache.read()
        y = layers.cached_attention(q, k, v, old_k.astype(dtype), old_v.astype(dtype),
                                    mask[..., :max_len], new_mask,
                                    cache_kernel=self.cache_kernel, written=cache.index)
      cache = cache.write(k, v)
    x = x + self.o(y, dtype)
    h = self.post_attention_norm(x, dtype)
    y = self.down(jax.nn.silu(self.gate(h, dtype)) * self.up(h, dtype), dtype)
    x = constrain(x + y, ('act_batch', 'act_len', 'act_embed'))
    return x, cache


class Llama(nnx.Module):
  """LlamaForCausalLM: `embed_tokens`, stacked `layers`, final `norm`, untied `lm_head`."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, remat_policy: str = 'none', attention_impl: str = 'xla',
               scan_layers: bool = True):
    self.cfg = cfg
    self.compute_dtype = compute_dtype
    self.remat_policy = remat_policy
    self.scan_layers = scan_layers
    self.embed_tokens = layers.param(rngs, jax.nn.initializers.normal(0.02),
                                     (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'),
                                     param_dtype)
    self.layers = layers.stacked(
        lambda r: DecoderLayer(cfg, rngs=r, param_dtype=param_dtype, compute_dtype=compute_dtype,
                               attention_impl=attention_impl), cfg.num_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, rngs=rngs, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = Dense((cfg.hidden_size,), (cfg.vocab_size,), ('embed',), ('vocab',),
                         use_bias=False, rngs=rngs, param_dtype=param_dtype,
                         kernel_init=jax.nn.initializers.normal(0.02))

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[batch, len] ids < vocab_size -> [batch, len, embed] (compute dtype)."""
    return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.compute_dtype)

  def head(self, x: jax.Array, last_only: bool = False) -> jax.Array:
    """Final norm + lm_head: [batch, len, embed] -> float32 logits [batch, len, vocab], or
    [batch, 1, vocab] for the last position only (a prefill needs no more: the head is the
    largest matmul)."""
    if last_only:
      x = x[:, -1:]
    logits = self.lm_head(self.norm(x, self.compute_dtype), self.compute_dtype)
    return constrain(logits.astype(jnp.float32), ('act_batch', 'act_len', 'act_vocab'))

  def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               cache: KVCache | None = None, *, last_only: bool = False, rope=None):
    """embeds: [batch, len, embed]; positions: int [batch, len]; attention_mask: [batch, len]
    (1 = real token). With `cache`, the tokens fill slots [cache.index, cache.index + len).
    rope: `rope_tables(positions, ...)` when the caller already has them (the decode loop
    computes every step's once, before the loop), else computed here.

    Returns (logits float32 [batch, len, vocab], or [batch, 1, vocab] with `last_only`, the
    updated cache or None).
    """
    num_layers = self.cfg.num_layers
    mask = decoder_mask(attention_mask, cache)
    if rope is None:
      rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
    x = constrain(embeds.astype(self.compute_dtype), ('act_batch', 'act_len', 'act_embed'))
    if cache is None:
      def body(x, layer, _):
        return layer(x, rope, mask, None)[0], None

      x, _ = layers.run_layers(body, x, self.layers, None, remat_policy=self.remat_policy,
                               length=num_layers, scan=self.scan_layers)
      return self.head(x, last_only), None

    # The whole cache rides in the carry and each layer writes its slab in place.
    def body(carry, layer, i):
      x, k, v = carry
      x, layer_cache = layer(x, rope, mask, cache.layer(i).replace(k=k, v=v))
      return (x, layer_cache.k, layer_cache.v), None

    (x, k, v), _ = layers.run_layers(body, (x, cache.k, cache.v), self.layers,
                                     jnp.arange(num_layers), remat_policy='none',
                                     length=num_layers, scan=self.scan_layers)
    cache = KVCache(k=k, v=v, mask=written_mask(cache, attention_mask),
                    index=cache.index + embeds.shape[1])
    return self.head(x, last_only), cache
