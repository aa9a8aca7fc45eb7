"""3D ViT encoder (docs/original.md section 2): patchify, learned 3D positions, pre-norm blocks.

No cls token, no pooling, no final norm: the output is every patch token after the last block.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax.config import VisionConfig
from radfm_jax.models import layers
from radfm_jax.models.layers import Dense, LayerNorm, constrain


def position_rows(n: int, n_max: int) -> np.ndarray:
  """Rows of a learned position table used for a grid of `n` patches along one axis.

  The original samples the table with a stride that ends on the last row,
  `(arange(n) + 1) * (n_max // n) - 1`, rather than taking a prefix (docs/original.md section 2).
  """
  if n > n_max:
    raise ValueError(f'{n} patches along an axis exceed the position table ({n_max} rows): the '
                     'input is larger than model.vision.image_size / frames')
  return (np.arange(n) + 1) * (n_max // n) - 1


def patchify(images: jax.Array, patch: int, frame_patch: int) -> jax.Array:
  """[n, channels, H, W, D] -> [n, (h w f), (p1 p2 pf c)]: tokens (h, w, f) with f fastest, each
  token's features ordered (p1, p2, pf, c) with the channel fastest."""
  return einops.rearrange(images, 'n c (h p1) (w p2) (f pf) -> n (h w f) (p1 p2 pf c)',
                          p1=patch, p2=patch, pf=frame_patch)


class VisionBlock(nnx.Module):
  """x = x + Attn(LN(x)); x = x + MLP(LN(x)), exact-erf GELU, LayerNorm eps 1e-5."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    d, h, hd = cfg.dim, cfg.heads, cfg.head_dim
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.attn_norm = LayerNorm(d, 'vis_embed', **kw)
    # The original's fused `to_qkv` (no bias) is stored as three projections.
    self.q = Dense((d,), (h, hd), ('vis_embed',), ('vis_heads', 'vis_kv'), use_bias=False, **kw)
    self.k = Dense((d,), (h, hd), ('vis_embed',), ('vis_heads', 'vis_kv'), use_bias=False, **kw)
    self.v = Dense((d,), (h, hd), ('vis_embed',), ('vis_heads', 'vis_kv'), use_bias=False, **kw)
    self.out = Dense((h, hd), (d,), ('vis_heads', 'vis_kv'), ('vis_embed',), use_bias=True, **kw)
    self.mlp_norm = LayerNorm(d, 'vis_embed', **kw)
    self.mlp_in = Dense((d,), (cfg.mlp_dim,), ('vis_embed',), ('vis_mlp',), use_bias=True, **kw)
    self.mlp_out = Dense((cfg.mlp_dim,), (d,), ('vis_mlp',), ('vis_embed',), use_bias=True, **kw)

  def __call__(self, x, rng, *, dtype, dropout_rate: float, attention_impl: str):
    """x: [images, tokens, vis_dim]; rng: dropout key or None."""
    keys = [None] * 4 if rng is None else list(jax.random.split(rng, 4))
    y = self.attn_norm(x, dtype)
    q, k, v = self.q(y, dtype), self.k(y, dtype), self.v(y, dtype)
    y = layers.attention(q, k, v, implementation=attention_impl, dropout_rate=dropout_rate,
                         dropout_rng=keys[0])
    x = x + layers.dropout(self.out(y, dtype), dropout_rate, keys[1])
    y = layers.gelu_exact(self.mlp_in(self.mlp_norm(x, dtype), dtype))
    y = self.mlp_out(layers.dropout(y, dropout_rate, keys[2]), dtype)
    x = x + layers.dropout(y, dropout_rate, keys[3])
    return constrain(x, ('act_batch', 'act_patches', 'act_embed'))


class ViT3D(nnx.Module):
  """[images, channels, H, W, D] -> [images, (H/p)*(W/p)*(D/pf), vis_dim]."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, remat_policy: str = 'none', attention_impl: str = 'xla',
               scan_layers: bool = True):
    self.cfg = cfg
    self.compute_dtype = compute_dtype
    self.remat_policy = remat_policy
    self.attention_impl = attention_impl
    self.scan_layers = scan_layers
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.patch_norm_in = LayerNorm(cfg.patch_dim, 'vis_patch', eps=cfg.patch_norm_eps, **kw)
    self.patch_proj = Dense((cfg.patch_dim,), (cfg.dim,), ('vis_patch',), ('vis_embed',),
                            use_bias=True, **kw)
    self.patch_norm_out = LayerNorm(cfg.dim, 'vis_embed', **kw)
    rows, cols, deps = cfg.pos_rows
    # uniform(0, 1) in the original (model.vision.pos_init_scale widens it for from-scratch runs)
    def uniform(key, shape, dtype):
      return jax.random.uniform(key, shape, dtype, 0.0, cfg.pos_init_scale)
    self.pos_row = layers.param(rngs, uniform, (rows, cfg.dim // 3), ('vis_pos', None), param_dtype)
    self.pos_col = layers.param(rngs, uniform, (cols, cfg.dim // 3), ('vis_pos', None), param_dtype)
    self.pos_dep = layers.param(rngs, uniform, (deps, cfg.dim // 3), ('vis_pos', None), param_dtype)
    self.blocks = layers.stacked(lambda r: VisionBlock(cfg, rngs=r, param_dtype=param_dtype),
                                 cfg.depth, rngs)

  def position_embedding(self, h: int, w: int, f: int) -> jax.Array:
    """[h*w*f, vis_dim]: concat(row, col, depth) rows for the (h, w, f) patch grid, f fastest."""
    rows, cols, deps = self.cfg.pos_rows
    row = self.pos_row[...][position_rows(h, rows)]
    col = self.pos_col[...][position_rows(w, cols)]
    dep = self.pos_dep[...][position_rows(f, deps)]
    third = row.shape[-1]
    grid = jnp.concatenate([
        jnp.broadcast_to(row[:, None, None], (h, w, f, third)),
        jnp.broadcast_to(col[None, :, None], (h, w, f, third)),
        jnp.broadcast_to(dep[None, None, :], (h, w, f, third)),
    ], axis=-1)
    return grid.reshape(h * w * f, 3 * third)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    cfg, dtype = self.cfg, self.compute_dtype
    _, channels, height, width, depth = images.shape
    if channels != cfg.channels or height % cfg.patch_size or width % cfg.patch_size or (
        depth % cfg.frame_patch_size):
      raise ValueError(f'images of shape [.., {channels}, {height}, {width}, {depth}]: expected '
                       f'{cfg.channels} channels, H and W multiples of {cfg.patch_size} and D a '
                       f'multiple of {cfg.frame_patch_size}')
    grid = (height // cfg.patch_size, width // cfg.patch_size, depth // cfg.frame_patch_size)
    x = patchify(images.astype(dtype), cfg.patch_size, cfg.frame_patch_size)
    x = self.patch_norm_out(self.patch_proj(self.patch_norm_in(x, dtype), dtype), dtype)
    x = x + self.position_embedding(*grid).astype(dtype)
    emb_rng, layer_rng = (None, None) if rng is None else jax.random.split(rng)
    x = layers.dropout(x, cfg.dropout, emb_rng)
    x = constrain(x, ('act_batch', 'act_patches', 'act_embed'))

    def body(x, block, key):
      return block(x, key, dtype=dtype, dropout_rate=cfg.dropout,
                   attention_impl=self.attention_impl), None

    x, _ = layers.run_layers(body, x, self.blocks, layers.layer_rngs(layer_rng, cfg.depth),
                             remat_policy=self.remat_policy, length=cfg.depth,
                             scan=self.scan_layers)
    return x
