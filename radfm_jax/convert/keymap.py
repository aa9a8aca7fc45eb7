"""Declarative key maps between our parameter paths and PyTorch state_dict keys (both directions).

One `Entry` per parameter kind: our path(s) ('/'-joined keys of `nnx.to_pure_dict`), the torch key
template (`{i}` = layer index; such entries map onto a leading stacked `layers` axis), and the
transform kind:

  copy    tensor unchanged (norm scales, position tables, biases, embeddings)
  linear  torch Linear weight (out, in) -> our kernel [*in_shape, *out_shape]: transpose + reshape
          (`n_in` = how many leading dims of our kernel are input dims, e.g. 2 for [heads, hd, dim])
  fused   one torch weight whose rows are the concatenation of several projections (`to_qkv`:
          q, k, v; `to_kv`: k, v); split evenly along the rows, then `linear` each
  alias   a second torch key holding the same tensor as another entry (`embedding_layer.weight` is
          the very Parameter `lang_model.model.embed_tokens.weight`): optional when reading, written
          when exporting

The same table drives `engine.torch_to_ours` and `engine.ours_to_torch`. Shapes are never stored
in the table: ours come from the model's abstract state, torch shapes are derived from ours.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: tuple[str, ...]      # our leaf paths ('llama/layers/q/kernel'); several for `fused`
  torch: str                 # torch key template; '{i}' marks a per-layer key
  kind: str = 'copy'         # 'copy' | 'linear' | 'fused' | 'alias'
  n_in: int = 1              # leading input dims of our kernel (linear / fused)

  @property
  def stacked(self) -> bool:
    return '{i}' in self.torch

  def key(self, i: int | None = None) -> str:
    return self.torch.format(i=i) if self.stacked else self.torch


def _e(ours: str | Sequence[str], torch: str, kind: str = 'copy', n_in: int = 1) -> Entry:
  ours = (ours,) if isinstance(ours, str) else tuple(ours)
  return Entry(ours, torch, kind, n_in)


# ------------------------------------------------------------------------------------------------
# Tables


def llama_table(ours: str = 'llama/', torch: str = '') -> list[Entry]:
  """HF `LlamaForCausalLM` keys (transformers 4.28+ layout, no biases). `ours`/`torch` are prefixes:
  '' / '' for a standalone `Llama` module, 'llama/' / 'lang_model.' inside RadFM."""
  layer = f'{torch}model.layers.{{i}}.'
  entries = [
      _e(f'{ours}embed_tokens', f'{torch}model.embed_tokens.weight'),
      _e(f'{ours}layers/input_norm/scale', layer + 'input_layernorm.weight'),
      _e(f'{ours}layers/q/kernel', layer + 'self_attn.q_proj.weight', 'linear'),
      _e(f'{ours}layers/k/kernel', layer + 'self_attn.k_proj.weight', 'linear'),
      _e(f'{ours}layers/v/kernel', layer + 'self_attn.v_proj.weight', 'linear'),
      _e(f'{ours}layers/o/kernel', layer + 'self_attn.o_proj.weight', 'linear', n_in=2),
      _e(f'{ours}layers/post_attention_norm/scale', layer + 'post_attention_layernorm.weight'),
      _e(f'{ours}layers/gate/kernel', layer + 'mlp.gate_proj.weight', 'linear'),
      _e(f'{ours}layers/up/kernel', layer + 'mlp.up_proj.weight', 'linear'),
      _e(f'{ours}layers/down/kernel', layer + 'mlp.down_proj.weight', 'linear'),
      _e(f'{ours}norm/scale', f'{torch}model.norm.weight'),
      _e(f'{ours}lm_head/kernel', f'{torch}lm_head.weight', 'linear'),
  ]
  return entries


def _layer_norm(ours: str, torch: str) -> list[Entry]:
  return [_e(f'{ours}/scale', f'{torch}.weight'), _e(f'{ours}/bias', f'{torch}.bias')]


def vision_table() -> list[Entry]:
  """`embedding_layer.vision_encoder` (vit_3d.ViT, docs/original.md section 2)."""
  t, b = 'embedding_layer.vision_encoder.', 'embedding_layer.vision_encoder.transformer.layers.{i}.'
  return [
      *_layer_norm('vision/patch_norm_in', t + 'to_patch_embedding.1'),
      _e('vision/patch_proj/kernel', t + 'to_patch_embedding.2.weight', 'linear'),
      _e('vision/patch_proj/bias', t + 'to_patch_embedding.2.bias'),
      *_layer_norm('vision/patch_norm_out', t + 'to_patch_embedding.3'),
      _e('vision/pos_row', t + 'pos_embedding.row_embed.weight'),
      _e('vision/pos_col', t + 'pos_embedding.col_embed.weight'),
      _e('vision/pos_dep', t + 'pos_embedding.dep_embed.weight'),
      *_layer_norm('vision/blocks/attn_norm', b + '0.norm'),
      # to_qkv rows: q, k, v (`.chunk(3, dim=-1)`), each '(h d)' with the head index outer.
      _e(('vision/blocks/q/kernel', 'vision/blocks/k/kernel', 'vision/blocks/v/kernel'),
         b + '0.fn.to_qkv.weight', 'fused'),
      _e('vision/blocks/out/kernel', b + '0.fn.to_out.0.weight', 'linear', n_in=2),
      _e('vision/blocks/out/bias', b + '0.fn.to_out.0.bias'),
      *_layer_norm('vision/blocks/mlp_norm', b + '1.norm'),
      _e('vision/blocks/mlp_in/kernel', b + '1.fn.net.0.weight', 'linear'),
      _e('vision/blocks/mlp_in/bias', b + '1.fn.net.0.bias'),
      _e('vision/blocks/mlp_out/kernel', b + '1.fn.net.3.weight', 'linear'),
      _e('vision/blocks/mlp_out/bias', b + '1.fn.net.3.bias'),
  ]


def perceiver_table() -> list[Entry]:
  """`embedding_layer.perceiver` (the flamingo-pytorch resampler, docs/original.md section 3)."""
  t, b = 'embedding_layer.perceiver.', 'embedding_layer.perceiver.layers.{i}.'
  return [
      _e('perceiver/latents', t + 'latents'),
      *_layer_norm('perceiver/layers/norm_media', b + '0.norm_media'),
      *_layer_norm('perceiver/layers/norm_latents', b + '0.norm_latents'),
      _e('perceiver/layers/q/kernel', b + '0.to_q.weight', 'linear'),
      # to_kv rows: first half keys, second half values (`.chunk(2, dim=-1)`).
      _e(('perceiver/layers/k/kernel', 'perceiver/layers/v/kernel'), b + '0.to_kv.weight', 'fused'),
      _e('perceiver/layers/out/kernel', b + '0.to_out.weight', 'linear', n_in=2),
      *_layer_norm('perceiver/layers/ff_norm', b + '1.0'),
      _e('perceiver/layers/ff_in/kernel', b + '1.1.weight', 'linear'),
      _e('perceiver/layers/ff_out/kernel', b + '1.3.weight', 'linear'),
      *_layer_norm('perceiver/norm', t + 'norm'),
  ]


def radfm_table() -> list[Entry]:
  """Every kept key of the official RadFM state dict (docs/original.md section 10)."""
  return [
      *vision_table(),
      *perceiver_table(),
      _e('fc/kernel', 'embedding_layer.fc.weight', 'linear'),
      _e('fc/bias', 'embedding_layer.fc.bias'),
      _e('figure_tokens', 'embedding_layer.figure_token_weight'),
      *llama_table('llama/', 'lang_model.'),
      _e('llama/embed_tokens', 'embedding_layer.weight', 'alias'),
  ]


# The checkpoint's dead branches (docs/original.md section 9) and recomputable buffers: skipped
# when reading, never written. Anything else unknown is an error.
RADFM_SKIP = (
    r'embedding_layer\.bert_model\..*',
    r'embedding_layer\.bert_projection_fc\..*',
    r'embedding_layer\.transformer_decoder\..*',
    r'embedding_layer\.transformer_decoder_mlp\..*',
    r'embedding_layer\.output_upscaling\..*',
    r'embedding_layer\.cls_head\..*',
    r'.*\.rotary_emb\.inv_freq',
)
LLAMA_SKIP = (r'.*\.rotary_emb\.inv_freq',)


def is_skipped(key: str, skip: Sequence[str]) -> bool:
  return any(re.fullmatch(p, key) for p in skip)


# ------------------------------------------------------------------------------------------------
# Transforms (numpy, one layer at a time)


def torch_shapes(entry: Entry, our_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
  """Torch shape of one (per-layer) tensor of `entry` given our per-layer leaf shapes."""
  shape = tuple(our_shapes[0])
  if entry.kind in ('copy', 'alias'):
    return shape
  n_in = entry.n_in
  rows, cols = math.prod(shape[n_in:]), math.prod(shape[:n_in])
  return (rows * len(entry.ours), cols)


def to_ours(entry: Entry, tensor: np.ndarray, our_shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
  """One torch tensor (one layer) -> our per-layer arrays, one per `entry.ours`."""
  if entry.kind in ('copy', 'alias'):
    return [tensor.reshape(our_shapes[0])]
  parts = np.split(tensor, len(entry.ours), axis=0) if entry.kind == 'fused' else [tensor]
  # (out, in) -> (in, out) -> [*in_shape, *out_shape]; the transpose copies, so the result owns
  # its memory and the (possibly memory-mapped) source can be released.
  return [np.ascontiguousarray(p.T).reshape(s) for p, s in zip(parts, our_shapes)]


def to_torch(entry: Entry, arrays: Sequence[np.ndarray]) -> np.ndarray:
  """Our per-layer arrays (one per `entry.ours`) -> the torch tensor of that layer."""
  if entry.kind in ('copy', 'alias'):
    return np.ascontiguousarray(arrays[0])
  mats = []
  for a in arrays:
    cols = math.prod(a.shape[:entry.n_in])
    mats.append(np.ascontiguousarray(a.reshape(cols, -1).T))
  return mats[0] if len(mats) == 1 else np.concatenate(mats, axis=0)


# ------------------------------------------------------------------------------------------------
# Blocks: large tensors move in slabs of torch rows, so neither side ever holds a whole tensor


def split_plan(entry: Entry, our_shape: tuple[int, ...], block_bytes: int,
               itemsize: int = 4) -> tuple[int, int] | None:
  """(axis of our per-layer leaf that torch rows run along, block length on it), or None to move
  the tensor whole (1-D tensors). Torch rows are our axis 0 for `copy`, the first output axis
  (`n_in`) of a kernel for `linear`/`fused`; blocks are whole units of that axis (heads for q/k/v)."""
  if len(our_shape) < 2:
    return None
  axis = 0 if entry.kind in ('copy', 'alias') else entry.n_in
  per_unit = math.prod(our_shape) // our_shape[axis] * itemsize
  return axis, max(1, min(our_shape[axis], block_bytes // per_unit))


def torch_rows_per_unit(entry: Entry, our_shape: tuple[int, ...]) -> int:
  """Torch rows behind one index of the split axis (a head of q = head_dim rows)."""
  return 1 if entry.kind in ('copy', 'alias') else math.prod(our_shape[entry.n_in + 1:])


def block_to_ours(entry: Entry, rows: np.ndarray, our_shape: tuple[int, ...], axis: int,
                  start: int, stop: int) -> tuple[tuple[slice, ...], np.ndarray]:
  """Torch rows for indices [start, stop) of the split axis -> (region of our leaf, array)."""
  region = (slice(None),) * axis + (slice(start, stop),)
  shape = our_shape[:axis] + (stop - start,) + our_shape[axis + 1:]
  if entry.kind in ('copy', 'alias'):
    return region, rows.reshape(shape)
  return region, np.ascontiguousarray(rows.T).reshape(shape)


def expected_keys(table: Sequence[Entry], our_shapes: dict[str, tuple[int, ...]],
                  num_layers: dict[str, int]) -> dict[str, tuple[int, ...]]:
  """Every torch key the table produces -> its shape, for the given our-side shapes.

  our_shapes: full (stacked) shape of each our path; num_layers: path -> stacked layer count.
  """
  out = {}
  for entry in table:
    if entry.stacked:
      n = num_layers[entry.ours[0]]
      per_layer = [our_shapes[p][1:] for p in entry.ours]
      for i in range(n):
        out[entry.key(i)] = torch_shapes(entry, per_layer)
    else:
      out[entry.key()] = torch_shapes(entry, [our_shapes[p] for p in entry.ours])
  return out


def layer_indices(keys, template: str) -> list[int]:
  """The layer indices `i` for which `template.format(i=i)` is in `keys` (sorted)."""
  pattern = re.compile(re.escape(template).replace(re.escape('{i}'), r'(\d+)'))
  found = set()
  for key in keys:
    m = pattern.fullmatch(key)
    if m:
      found.add(int(m.group(1)))
  return sorted(found)
