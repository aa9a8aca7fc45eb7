"""Analytic matmul FLOPs of a RadFM forward pass (for MFU and benchmarks).

XLA's `cost_analysis()` counts a scanned layer body once, so FLOPs are counted here from the
shapes: 2 * m * n * k for every matmul, attention scores and values included (full, unmasked
attention as computed). A training step is 3x the forward (forward + two backward matmuls); remat
recompute is not counted (model FLOPs, as MFU is usually defined).
"""

from __future__ import annotations

import dataclasses

from radfm_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FlopCount:
  vision: float
  perceiver: float
  projection: float
  decoder: float
  lm_head: float

  @property
  def forward(self) -> float:
    return self.vision + self.perceiver + self.projection + self.decoder + self.lm_head

  @property
  def train_step(self) -> float:
    return 3.0 * self.forward


def image_tokens(cfg: ModelConfig, height: int, width: int, depth: int) -> int:
  v = cfg.vision
  return (height // v.patch_size) * (width // v.patch_size) * (depth // v.frame_patch_size)


def forward_flops(cfg: ModelConfig, batch: int, images_per_sample: int,
                  image_shape: tuple[int, int, int], text_len: int) -> FlopCount:
  """FLOPs of one forward over `batch` samples, each with `images_per_sample` images of
  `image_shape` (H, W, D) and `text_len` tokens."""
  v, p, l = cfg.vision, cfg.perceiver, cfg.llama
  n_images = batch * images_per_sample
  n = image_tokens(cfg, *image_shape)
  v_inner = v.heads * v.head_dim
  vision_layer = 2 * n * v.dim * 3 * v_inner + 2 * 2 * n * n * v_inner + 2 * n * v_inner * v.dim \
      + 2 * 2 * n * v.dim * v.mlp_dim
  vision = n_images * (2 * n * v.patch_dim * v.dim + v.depth * vision_layer)
  m = p.num_latents
  p_inner = p.heads * p.head_dim
  ff = v.dim * p.ff_mult
  perceiver_layer = 2 * m * v.dim * p_inner + 2 * (n + m) * v.dim * 2 * p_inner \
      + 2 * 2 * m * (n + m) * p_inner + 2 * m * p_inner * v.dim + 2 * 2 * m * v.dim * ff
  perceiver = n_images * p.depth * perceiver_layer
  projection = n_images * 2 * m * v.dim * l.hidden_size
  tokens = batch * text_len
  e, h = l.hidden_size, l.num_heads * l.head_dim
  decoder_layer = 2 * tokens * e * 4 * h + 2 * 3 * tokens * e * l.intermediate_size \
      + 2 * 2 * batch * text_len * text_len * h
  decoder = l.num_layers * decoder_layer
  lm_head = 2 * tokens * e * l.vocab_size
  return FlopCount(float(vision), float(perceiver), float(projection), float(decoder),
                   float(lm_head))


def batch_flops(cfg: ModelConfig, batch: dict) -> FlopCount:
  """Forward FLOPs for a batch dict (`images` [B, S, 3, H, W, D], `tokens` [B, L])."""
  b, s, _, h, w, d = batch['images'].shape
  return forward_flops(cfg, b, s, (h, w, d), batch['tokens'].shape[1])


def one_hot_splice_flops(cfg: ModelConfig, batch: int, images_per_sample: int,
                         text_len: int) -> float:
  """FLOPs of the original's one-hot splice: [L, table] x [table, E] per sample, where the table
  has vocab + 2 + 32 * S rows. The gather this port uses does no arithmetic."""
  rows = cfg.image_token_offset + cfg.perceiver.num_latents * images_per_sample
  return float(batch * 2 * text_len * rows * cfg.llama.hidden_size)
