"""Model sizes: `tiny` (tests), `small` (CPU demo), `bench` (CPU benchmark), `radfm_13b` (official).

Each entry is a plain dict merged into the `model` section of the config. `radfm_13b` is exactly the
official checkpoint (docs/original.md sections 2-6); the rest shrink widths and depths but keep the
RadFM structure (patch layout, 32 latents, image-token id layout).
"""

import ml_collections


def _size(vision, perceiver, llama):
  return {'vision': vision, 'perceiver': perceiver, 'llama': llama}


SIZES = {
    'tiny': _size(
        vision=dict(image_size=64, frames=16, patch_size=16, frame_patch_size=4, dim=48, depth=2,
                    heads=4, head_dim=8, mlp_dim=96),
        perceiver=dict(depth=2, heads=4, head_dim=8, num_latents=32, ff_mult=4),
        llama=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, max_position_embeddings=1024),
    ),
    'small': _size(
        vision=dict(image_size=128, frames=64, patch_size=16, frame_patch_size=4, dim=192, depth=4,
                    heads=4, head_dim=48, mlp_dim=512),
        perceiver=dict(depth=2, heads=4, head_dim=48, num_latents=32, ff_mult=4),
        llama=dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4,
                   num_heads=4, max_position_embeddings=1024),
    ),
    'bench': _size(
        vision=dict(image_size=256, frames=64, patch_size=32, frame_patch_size=4, dim=384, depth=4,
                    heads=6, head_dim=64, mlp_dim=1536),
        perceiver=dict(depth=2, heads=6, head_dim=64, num_latents=32, ff_mult=4),
        llama=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=6,
                   num_heads=12, max_position_embeddings=2048),
    ),
    # ~1B parameters, for accelerator MFU measurements.
    'radfm_1b': _size(
        vision=dict(image_size=512, frames=512, patch_size=32, frame_patch_size=4, dim=768, depth=12,
                    heads=8, head_dim=64, mlp_dim=2048),
        perceiver=dict(depth=6, heads=8, head_dim=64, num_latents=32, ff_mult=4),
        llama=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_layers=16,
                   num_heads=16, max_position_embeddings=2048),
    ),
    'radfm_13b': _size(
        vision=dict(image_size=512, frames=512, patch_size=32, frame_patch_size=4, dim=768, depth=12,
                    heads=8, head_dim=64, mlp_dim=2048),
        perceiver=dict(depth=6, heads=8, head_dim=64, num_latents=32, ff_mult=4),
        llama=dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                   num_heads=40, max_position_embeddings=2048),
    ),
}


def get_config(arg='tiny'):
  """`configs/model_sizes.py:NAME` gives the `model` section alone."""
  return ml_collections.ConfigDict(SIZES[arg])
