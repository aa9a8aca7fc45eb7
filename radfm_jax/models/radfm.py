"""The whole RadFM model: images -> ViT -> Perceiver -> fc -> spliced into the text -> LLaMA logits.

    model = RadFM(cfg.model, rngs=nnx.Rngs(0))
    logits = model(tokens, images, attention_mask=mask, image_mask=img_mask)   # [B, L, vocab]

Token ids follow RadFM's layout (docs/original.md sections 5, 7): ids < vocab are text, `vocab` and
`vocab + 1` are `<image>` / `</image>` (the two `figure_tokens` rows), and `vocab + 2 + k` is image
token k of the sample, k = s * num_latents + j (image s, latent j).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax import sharding
from radfm_jax.config import ModelConfig
from radfm_jax.models import layers
from radfm_jax.models.layers import Dense, constrain
from radfm_jax.models.llama import Llama
from radfm_jax.models.perceiver import PerceiverResampler
from radfm_jax.models.vit3d import ViT3D


def splice_image_tokens(tokens: jax.Array, text_table: jax.Array, figure_table: jax.Array,
                        image_tokens: jax.Array) -> jax.Array:
  """Embeds RadFM token ids with a row gather (equal to the original's one-hot matmul).

  tokens: int [batch, len]; text_table: [vocab, embed]; figure_table: [2, embed];
  image_tokens: [batch, images * latents, embed]. Returns [batch, len, embed].
  """
  vocab = text_table.shape[0]
  num_figure = figure_table.shape[0]
  dtype = image_tokens.dtype
  text = jnp.take(text_table, jnp.clip(tokens, 0, vocab - 1), axis=0).astype(dtype)
  figure = jnp.take(figure_table, jnp.clip(tokens - vocab, 0, num_figure - 1), axis=0).astype(dtype)
  image_index = jnp.clip(tokens - vocab - num_figure, 0, image_tokens.shape[1] - 1)
  image = jnp.take_along_axis(image_tokens, image_index[..., None], axis=1)
  return jnp.where((tokens < vocab)[..., None], text,
                   jnp.where((tokens < vocab + num_figure)[..., None], figure, image))


class RadFM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    param_dtype = jnp.dtype(cfg.param_dtype)
    common = dict(param_dtype=param_dtype, compute_dtype=jnp.dtype(cfg.compute_dtype),
                  remat_policy=cfg.remat_policy, attention_impl=cfg.attention,
                  scan_layers=cfg.scan_layers)
    self.vision = ViT3D(cfg.vision, rngs=rngs, **common)
    self.perceiver = PerceiverResampler(cfg.perceiver, cfg.vision.dim, rngs=rngs, **common)
    self.fc = Dense((cfg.vision.dim,), (cfg.llama.hidden_size,), ('vis_proj',), ('embed',),
                    use_bias=True, rngs=rngs, param_dtype=param_dtype)
    self.figure_tokens = layers.param(rngs, jax.nn.initializers.normal(1.0),
                                      (cfg.num_figure_tokens, cfg.llama.hidden_size),
                                      (None, 'embed'), param_dtype)
    self.llama = Llama(cfg.llama, rngs=rngs, **common)
    self.set_attributes(dense_backward=cfg.dense_backward)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.cfg.compute_dtype)

  def encode_images(self, images: jax.Array, image_mask: jax.Array | None = None,
                    rng: jax.Array | None = None) -> jax.Array:
    """[batch, images, channels, H, W, D] -> [batch, images * latents, embed], image-major.

    Each image is encoded on its own; rows of padding images (image_mask False) are zeroed, and no
    valid token id refers to them.
    """
    batch, num_images = images.shape[:2]
    flat = images.reshape((batch * num_images,) + images.shape[2:])
    flat = constrain(flat, ('act_batch', None, None, None, None))
    media = self.vision(flat, rng)
    latents = self.perceiver(media)                              # [B*S, n, vis_dim]
    tokens = self.fc(latents, self.compute_dtype)                # [B*S, n, embed]
    tokens = tokens.reshape(batch, num_images, tokens.shape[1], tokens.shape[2])
    if image_mask is not None:
      tokens = jnp.where(image_mask[:, :, None, None], tokens, jnp.zeros_like(tokens))
    tokens = tokens.reshape(batch, num_images * tokens.shape[2], tokens.shape[3])
    return constrain(tokens, ('act_batch', 'act_len', 'act_embed'))

  def embed_inputs(self, tokens: jax.Array, images: jax.Array | None,
                   image_mask: jax.Array | None = None, rng: jax.Array | None = None,
                   image_tokens: jax.Array | None = None) -> jax.Array:
    """[batch, len] RadFM ids (+ images, or their `encode_images` output `image_tokens`
    [batch, images * latents, embed] made earlier, e.g. read from the image-token cache) ->
    [batch, len, embed] decoder inputs."""
    if image_tokens is not None:
      image_tokens = image_tokens.astype(self.compute_dtype)
    elif images is None or images.shape[1] == 0:
      image_tokens = jnp.zeros((tokens.shape[0], 1, self.cfg.llama.hidden_size), self.compute_dtype)
    else:
      image_tokens = self.encode_images(images, image_mask, rng)
    embeds = splice_image_tokens(tokens, self.llama.embed_tokens[...], self.figure_tokens[...],
                                 image_tokens)
    return constrain(embeds, ('act_batch', 'act_len', 'act_embed'))

  def __call__(self, tokens: jax.Array, images: jax.Array | None,
               attention_mask: jax.Array | None = None, image_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, rng: jax.Array | None = None,
               image_tokens: jax.Array | None = None) -> jax.Array:
    """tokens: int [batch, len]; images: float [batch, images, 3, H, W, D];
    attention_mask: [batch, len] (1 = real token, default all ones); image_mask: bool
    [batch, images]; positions: default arange(len), as the original's plain forward; rng: dropout
    key (training) or None (eval); image_tokens: `encode_images` output made earlier (then
    images is ignored and the vision tower skipped). Returns float32 logits [batch, len, vocab]."""
    batch, length = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    embeds = self.embed_inputs(tokens, images, image_mask, rng, image_tokens)
    logits, _ = self.llama(embeds, positions, attention_mask)
    return logits


# ------------------------------------------------------------------------------------------------
# Construction helpers


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                 rules=None) -> RadFM:
  """A RadFM with random weights. With a mesh (+ rules), parameters are created already sharded;
  without one, on the default device."""
  if mesh is None:
    with nnx.use_eager_sharding(False):
      return RadFM(cfg, rngs=nnx.Rngs(seed))
  with sharding.use_mesh(mesh, rules or sharding.LOGICAL_RULES['fsdp']):
    return RadFM(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, rules=None):
  """(graphdef, abstract state) without allocating: ShapeDtypeStructs carrying their shardings
  when a mesh is given."""
  if mesh is None:
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(lambda: RadFM(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)
  with nnx.logical_axis_rules(rules or sharding.LOGICAL_RULES['fsdp']):
    return nnx.get_abstract_model(lambda: RadFM(cfg, rngs=nnx.Rngs(0)), mesh)


def count_params(state) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def param_bytes(state) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
