"""Perceiver resampler (docs/original.md section 3): 32 learned latents cross-attend to each image.

Keys and values come from concat(LN_media(media), LN_latents(latents)) along the token axis; the
media tokens are re-normalised in every layer from the same ViT output and never updated. No biases
anywhere except the LayerNorms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from radfm_jax.config import PerceiverConfig
from radfm_jax.models import layers
from radfm_jax.models.layers import Dense, LayerNorm, constrain


class PerceiverLayer(nnx.Module):

  def __init__(self, cfg: PerceiverConfig, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    h, hd = cfg.heads, cfg.head_dim
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.norm_media = LayerNorm(dim, 'vis_embed', **kw)
    self.norm_latents = LayerNorm(dim, 'vis_embed', **kw)
    self.q = Dense((dim,), (h, hd), ('vis_embed',), ('vis_heads', 'vis_kv'), use_bias=False, **kw)
    # The original's fused `to_kv` (first half keys, second half values) is stored as two.
    self.k = Dense((dim,), (h, hd), ('vis_embed',), ('vis_heads', 'vis_kv'), use_bias=False, **kw)
    self.v = Dense((dim,), (h, hd), ('vis_embed',), ('vis_heads', 'vis_kv'), use_bias=False, **kw)
    self.out = Dense((h, hd), (dim,), ('vis_heads', 'vis_kv'), ('vis_embed',), use_bias=False, **kw)
    self.ff_norm = LayerNorm(dim, 'vis_embed', **kw)
    self.ff_in = Dense((dim,), (dim * cfg.ff_mult,), ('vis_embed',), ('vis_mlp',), use_bias=False,
                       **kw)
    self.ff_out = Dense((dim * cfg.ff_mult,), (dim,), ('vis_mlp',), ('vis_embed',), use_bias=False,
                        **kw)

  def __call__(self, latents, media, *, dtype, attention_impl: str):
    """latents: [images, num_latents, vis_dim]; media: [images, tokens, vis_dim]."""
    xm = self.norm_media(media, dtype)
    lt = self.norm_latents(latents, dtype)
    kv_in = jnp.concatenate([xm, lt], axis=1)
    y = layers.attention(self.q(lt, dtype), self.k(kv_in, dtype), self.v(kv_in, dtype),
                         implementation=attention_impl)
    latents = self.out(y, dtype) + latents
    y = self.ff_out(layers.gelu_exact(self.ff_in(self.ff_norm(latents, dtype), dtype)), dtype)
    return constrain(y + latents, ('act_batch', 'act_latents', 'act_embed'))


class PerceiverResampler(nnx.Module):
  """[images, tokens, vis_dim] -> [images, num_latents, vis_dim] (each image separately)."""

  def __init__(self, cfg: PerceiverConfig, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, remat_policy: str = 'none', attention_impl: str = 'xla',
               scan_layers: bool = True):
    self.cfg = cfg
    self.compute_dtype = compute_dtype
    self.remat_policy = remat_policy
    self.attention_impl = attention_impl
    self.scan_layers = scan_layers
    self.latents = layers.param(rngs, jax.nn.initializers.normal(cfg.latent_init_std),
                                (cfg.num_latents, dim),
                                ('latents', 'vis_embed'), param_dtype)
    self.layers = layers.stacked(
        lambda r: PerceiverLayer(cfg, dim, rngs=r, param_dtype=param_dtype), cfg.depth, rngs)
    self.norm = LayerNorm(dim, 'vis_embed', rngs=rngs, param_dtype=param_dtype)

  def __call__(self, media: jax.Array) -> jax.Array:
    dtype = self.compute_dtype
    media = media.astype(dtype)
    latents = jnp.broadcast_to(self.latents[...].astype(dtype),
                               (media.shape[0],) + self.latents.shape)

    def body(latents, layer, _):
      return layer(latents, media, dtype=dtype, attention_impl=self.attention_impl), None

    latents, _ = layers.run_layers(body, latents, self.layers, None,
                                   remat_policy=self.remat_policy, length=self.cfg.depth,
                                   scan=self.scan_layers)
    return self.norm(latents, dtype)
