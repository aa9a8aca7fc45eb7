"""LLaMA decoder (reference section 6, HF transformers 4.28.1 semantics) with a KV cache.

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

  k, v: [layers, batch, heads, max_len, head_dim] (heads before slots, so decode attention reads
  the cache without a transpose); mask: bool [batch, max_len], True where a slot holds a real
  (non-padding) token; index: int32 scalar, the next slot to write.
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> 'KVCache':
    shape = (cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


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

  def __call__(self, x, rope, mask, kv, cache_index, *, dtype, attention_impl: str):
    """x: [batch, len, embed]; mask: bool [batch, 1, len, keys]; kv: this layer's cache
    (k, v), each [batch, heads, max_len, head_dim], or None. Returns (x, updated (k, v) or None)."""
    cos, sin = rope
    h = self.input_norm(x, dtype)
    q = apply_rope(self.q(h, dtype), cos, sin)
    k = apply_rope(self.k(h, dtype), cos, sin)
    v = self.v(h, dtype)
    q = constrain(q, ('act_batch', 'act_len', 'act_heads', 'act_kv'))
    if kv is None:
      y = layers.attention(q, k, v, mask, implementation=attention_impl)
    else:
      cache_k, cache_v = kv
      start = (0, 0, cache_index, 0)
      cache_k = jax.lax.dynamic_update_slice(
          cache_k, k.swapaxes(1, 2).astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(
          cache_v, v.swapaxes(1, 2).astype(cache_v.dtype), start)
      kv = (cache_k, cache_v)
      y = layers.cached_attention(q, cache_k.astype(dtype), cache_v.astype(dtype), mask)
    x = x + self.o(y, dtype)
    h = self.post_attention_norm(x, dtype)
    y = self.down(jax.nn.silu(self.gate(h, dtype)) * self.up(h, dtype), dtype)
    x = constrain(x + y, ('act_batch', 'act_len', 'act_embed'))
    return x, kv


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

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[batch, len] ids < vocab_size -> [batch, len, embed] (compute dtype)."""
    return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.compute_dtype)

  def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               cache: KVCache | None = None):
    """embeds: [batch, len, embed]; positions: int [batch, len]; attention_mask: [batch, len]
    (1 = real token). With `cache`, the tokens fill slots [cache.index, cache.index + len).

    Returns (logits float32 [batch, len, vocab], updated cache or None).
    """
    cfg, dtype = self.cfg, self.compute_dtype
    length = embeds.shape[1]
    token_mask = attention_mask.astype(bool)
    if cache is None:
      key_mask = token_mask
      key_pos = jnp.arange(length)
      query_pos = jnp.arange(length)
    else:
      index = cache.index
      key_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, index))
      key_pos = jnp.arange(cache.mask.shape[1])
      query_pos = index + jnp.arange(length)
    # Causal + key padding, [batch, 1, len, keys].
    mask = (key_pos[None, :] <= query_pos[:, None])[None, None] & key_mask[:, None, None, :]
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x = constrain(embeds.astype(dtype), ('act_batch', 'act_len', 'act_embed'))

    if cache is None:
      def body(x, layer, _):
        return layer(x, rope, mask, None, 0, dtype=dtype, attention_impl=self.attention_impl)[0], None

      x, _ = layers.scan_layers(body, x, self.layers, None, remat_policy=self.remat_policy,
                                length=cfg.num_layers)
    else:
      # The whole cache rides in the scan carry and each layer updates its slab in place; as a
      # scanned input/output it would be copied whole at every decode step.
      def body(carry, layer, i):
        x, cache_k, cache_v = carry
        kv = (cache_k[i], cache_v[i])
        x, (k_i, v_i) = layer(x, rope, mask, kv, index, dtype=dtype,
                              attention_impl=self.attention_impl)
        return (x, cache_k.at[i].set(k_i), cache_v.at[i].set(v_i)), None

      (x, cache_k, cache_v), _ = layers.scan_layers(
          body, (x, cache.k, cache.v), self.layers, jnp.arange(cfg.num_layers),
          remat_policy='none', length=cfg.num_layers)
    logits = self.lm_head(self.norm(x, dtype), dtype).astype(jnp.float32)
    logits = constrain(logits, ('act_batch', 'act_len', 'act_vocab'))
    if cache is not None:
      cache = KVCache(k=cache_k, v=cache_v, mask=key_mask, index=index + length)
    return logits, cache
