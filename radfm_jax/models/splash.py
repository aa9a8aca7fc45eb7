"""Splash attention (Pallas TPU kernel) for the decoder's causal, key-padded self-attention.

`model.attention = 'splash'` routes `layers.attention` here. It is a TPU-only kernel: it never
materialises the [batch, heads, len, len] scores that XLA's attention builds in fp32 (40 x 2048^2 x
4 bytes = 640 MiB per example and layer at 13B / text 2048), the memory that decides the 13B
per-chip batch on a 31.25 GiB v6e chip (docs/performance.md, fit table).

The kernel works on one example with heads first ([heads, len, head_dim]); it is vmapped over the
batch and wrapped in `shard_map` over the context mesh, batch sharded like `act_batch` and heads
like `act_heads`, because GSPMD cannot partition a Pallas call (it would gather the whole batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from radfm_jax import sharding


def _block(length: int, preferred: int = 512) -> int:
  """Largest of 512 / 256 / 128 dividing `length` (the kernel tiles the sequence by it)."""
  for b in (preferred, 256, 128):
    if length % b == 0:
      return b
  raise ValueError(f'splash attention needs a sequence length that is a multiple of 128, got '
                   f'{length}')


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, length: int, interpret: bool = False):
  block = _block(length)
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                block_q_dq=block, block_kv_dq=block)
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length))] * heads)
  return kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                     interpret: bool = False) -> jax.Array:
  """Causal self-attention with key padding, as `layers.attention` computes it for the decoder.

  q, k, v: [batch, len, heads, head_dim] (len a multiple of 128); mask: None or bool
  [batch, 1, len, len] = causal & key padding, the decoder's training mask. Its last query row is
  the key-padding mask (every key is causally visible from the last position); it becomes the
  segment ids (1 = token, 0 = padding), so padded queries attend only padding and no row is empty.
  Returns [batch, len, heads, head_dim] in q's dtype. `interpret` runs the kernel in the Pallas
  interpreter (any backend; for tests).
  """
  batch, length, heads, head_dim = q.shape
  segments = None
  if mask is not None:
    if mask.shape != (batch, 1, length, length):
      raise ValueError(f'splash attention takes the [batch, 1, len, len] causal self-attention '
                       f'mask, got {mask.shape}')
    segments = mask[:, 0, -1, :].astype(jnp.int32)          # [batch, len]
  # The kernel does not scale the scores.
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
  q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))            # [batch, heads, len, head_dim]

  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return _local(q, k, v, segments, interpret).swapaxes(1, 2)
  batch_axes, head_axes = sharding.logical_to_spec(('act_batch', 'act_heads'))
  qkv_spec = PartitionSpec(batch_axes, head_axes, None, None)
  seg_spec = PartitionSpec(batch_axes, None)
  if segments is None:
    fn = jax.shard_map(lambda q, k, v: _local(q, k, v, None, interpret), mesh=mesh,
                       in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v).swapaxes(1, 2)
  fn = jax.shard_map(functools.partial(_local, interpret=interpret), mesh=mesh,
                     in_specs=(qkv_spec,) * 3 + (seg_spec,),
                     out_specs=qkv_spec, check_vma=False)
  return fn(q, k, v, segments).swapaxes(1, 2)


def _local(q, k, v, segments, interpret=False):
  """One shard: q, k, v [batch, heads, len, head_dim], segments None or int [batch, len]."""
  kernel = _kernel(q.shape[1], q.shape[2], interpret)
  if segments is None:
    return jax.vmap(kernel)(q, k, v)
  ids = kernel_lib.SegmentIds(q=segments, kv=segments)
  return jax.vmap(kernel)(q, k, v, ids)


__all__ = ['causal_attention']
