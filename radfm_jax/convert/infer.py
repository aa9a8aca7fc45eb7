"""Model sizes from a checkpoint's tensor shapes, so a checkpoint with the official key names but
other sizes converts without a hand-made config.

Where each field comes from (official key names abbreviated: `ve` = embedding_layer.vision_encoder,
`pr` = embedding_layer.perceiver, `lm` = lang_model.model):

| field | source |
| --- | --- |
| vision.dim, patch_dim | `ve.to_patch_embedding.2.weight` (dim, patch_dim) |
| vision.patch_size | sqrt(patch_dim / (channels * frame_patch_size)); channels, frame_patch_size from the config (default 3, 4) |
| vision.image_size, frames | pos table rows (`row_embed`, `dep_embed`) x patch_size / frame_patch_size |
| vision.depth | number of `ve.transformer.layers.{i}` |
| vision.heads x head_dim | inner = `to_out.0.weight` columns; head_dim from the config when it divides inner, else 64 |
| vision.mlp_dim | `net.0.weight` rows |
| perceiver.depth, num_latents | number of `pr.layers.{i}`; `pr.latents` rows |
| perceiver.heads x head_dim | inner = `to_q.weight` rows; head_dim as for the ViT |
| perceiver.ff_mult | `1.1.weight` rows / dim |
| llama.vocab_size, hidden_size | `lm.embed_tokens.weight` |
| llama.intermediate_size, num_layers | `mlp.gate_proj.weight` rows; number of `lm.layers.{i}` |
| llama.num_heads | NOT in the shapes: `--llama-heads`, else the HF config.json, else the config, else hidden / 128 |
| everything else (eps, rope theta, dtypes, dropout, max positions) | the config, or the official defaults |
"""

from __future__ import annotations

import dataclasses
import math

from radfm_jax.config import (ConfigError, LlamaConfig, ModelConfig, PerceiverConfig, VisionConfig,
                              validate_model)
from radfm_jax.convert import keymap

VE = 'embedding_layer.vision_encoder.'
PR = 'embedding_layer.perceiver.'


def _heads(inner: int, head_dim: int | None, field: str) -> tuple[int, int]:
  for hd in (head_dim, 64):
    if hd and inner % hd == 0:
      return inner // hd, hd
  raise ConfigError(f'config field {field}: cannot split the attention width {inner} into heads '
                    f'(head_dim {head_dim} or 64 do not divide it); pass a config with the head size')


def _check_hf_features(hf: dict, hidden: int, heads: int):
  """Our decoder is plain LLaMA-1/2 multi-head attention: refuse HF configs it cannot reproduce."""
  problems = []
  kv_heads = hf.get('num_key_value_heads')
  if kv_heads not in (None, heads):
    problems.append(f'grouped-query attention (num_key_value_heads {kv_heads} != {heads} heads)')
  if hf.get('head_dim') not in (None, hidden // heads):
    problems.append(f"head_dim {hf['head_dim']} != hidden_size / heads = {hidden // heads}")
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    problems.append(f'rope scaling {rope}')
  for flag in ('attention_bias', 'mlp_bias', 'tie_word_embeddings'):
    if hf.get(flag):
      problems.append(f'{flag}=true')
  if hf.get('hidden_act', 'silu') != 'silu':
    problems.append(f"hidden_act {hf['hidden_act']}")
  if problems:
    raise ConfigError('the HF LLaMA config uses features the RadFM decoder does not have: '
                      + '; '.join(problems))


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _hf_number(value, kind: type, field: str, hf_path: str):
  """An HF config.json number as `kind` (int or float) without changing it: a bool, a string, a
  non-finite or a fractional value for an integer field is a ConfigError naming the field."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and kind is int:
    ok = float(value).is_integer()
  if not ok:
    raise ConfigError(f'{hf_path} field {field}: {value!r}; expected a finite '
                      f'{"integer" if kind is int else "number"}')
  return kind(value)


def infer_llama(reader, prefix: str, base: LlamaConfig, heads: int | None = None,
                hf_config: dict | None = None, hf_path: str = 'HF config.json') -> LlamaConfig:
  """LlamaConfig from HF LLaMA keys under `prefix` ('' or 'lang_model.'); `hf_config`: the HF
  config.json beside them (`hf_path` names it in errors), whose sizes must match the keys'."""
  keys = reader.keys()
  if f'{prefix}model.embed_tokens.weight' not in keys:
    raise ConfigError(f'checkpoint has no {prefix}model.embed_tokens.weight key; expected HF '
                      'LLaMA keys' + (' (a RadFM state dict converts with from-torch)'
                                      if not prefix and 'lang_model.model.embed_tokens.weight'
                                      in keys else ''))
  vocab, hidden = reader.shape(f'{prefix}model.embed_tokens.weight')
  layers = keymap.layer_indices(keys, f'{prefix}model.layers.{{i}}.mlp.gate_proj.weight')
  if not layers:
    raise ConfigError(f'checkpoint has no {prefix}model.layers.{{i}} keys')
  mlp = reader.shape(f'{prefix}model.layers.{layers[0]}.mlp.gate_proj.weight')[0]
  hf = {} if hf_config is None else hf_config
  if not isinstance(hf, dict):
    raise ConfigError(f'{hf_path}: got a JSON {type(hf).__name__}; expected an object')
  # The sizes the shards show must be the ones config.json names: a shard missing from the folder
  # would otherwise convert into a smaller model.
  for field, found in (('vocab_size', vocab), ('hidden_size', hidden),
                       ('intermediate_size', mlp), ('num_hidden_layers', len(layers))):
    if field in hf and hf[field] != found:
      raise ConfigError(f'{hf_path} field {field}: {hf[field]!r}, but the shards hold '
                        f'{found}; expected the config of these weights (a shard missing?)')
  if layers != list(range(len(layers))):
    raise ConfigError(f'checkpoint layers {prefix}model.layers.{{i}}: got indices {layers}; '
                      f'expected 0..{len(layers) - 1} (a layer missing?)')
  # the head count given (--llama-heads), else config.json's: a positive divisor of hidden
  source, expected = f'--llama-heads {heads!r}:', f"the checkpoint's hidden size {hidden}"
  if heads is None:
    heads = hf.get('num_attention_heads')
    source, expected = f'{hf_path} field num_attention_heads: {heads!r};', f'hidden_size {hidden}'
  if heads is not None and (not _is_int(heads) or heads < 1 or hidden % heads):
    raise ConfigError(f'{source} expected a positive integer dividing {expected}')
  if heads is None:
    heads = base.num_heads if hidden % base.num_heads == 0 and base.hidden_size == hidden else None
  if heads is None:
    if hidden % 128:
      raise ConfigError(f'config field model.llama.num_heads: the checkpoint (hidden {hidden}) does '
                        'not say how many heads; pass --llama-heads or a config')
    heads = hidden // 128
  _check_hf_features(hf, hidden, heads)
  # transformers >= 5 nests rope_theta in `rope_parameters`; older configs keep it at the top level.
  rope = dict(hf.get('rope_parameters') or {})
  if 'rope_theta' in hf:
    rope.setdefault('rope_theta', hf['rope_theta'])
  extra = {}
  for ours, value in (('rms_norm_eps', hf.get('rms_norm_eps')),
                      ('rope_theta', rope.get('rope_theta')),
                      ('max_position_embeddings', hf.get('max_position_embeddings'))):
    if value is not None:
      extra[ours] = _hf_number(value, type(getattr(base, ours)), ours, hf_path)
  return dataclasses.replace(base, vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                             num_layers=len(layers), num_heads=heads, **extra)


def infer_vision(reader, base: VisionConfig) -> VisionConfig:
  keys = reader.keys()
  dim, patch_dim = reader.shape(VE + 'to_patch_embedding.2.weight')
  area = patch_dim / (base.channels * base.frame_patch_size)
  patch = math.isqrt(int(area))
  if patch * patch != area:
    raise ConfigError(f'config field model.vision.patch_size: patch_dim {patch_dim} is not '
                      f'p*p*{base.frame_patch_size}*{base.channels}; pass a config with the right '
                      'channels / frame_patch_size')
  rows = reader.shape(VE + 'pos_embedding.row_embed.weight')[0]
  deps = reader.shape(VE + 'pos_embedding.dep_embed.weight')[0]
  layers = keymap.layer_indices(keys, VE + 'transformer.layers.{i}.0.fn.to_qkv.weight')
  if not layers:
    raise ConfigError('checkpoint has no vision_encoder.transformer.layers.{i} keys')
  inner = reader.shape(VE + f'transformer.layers.{layers[0]}.0.fn.to_out.0.weight')[1]
  heads, head_dim = _heads(inner, base.head_dim, 'model.vision.heads')
  mlp = reader.shape(VE + f'transformer.layers.{layers[0]}.1.fn.net.0.weight')[0]
  return dataclasses.replace(base, dim=dim, patch_size=patch, image_size=rows * patch,
                             frames=deps * base.frame_patch_size, depth=len(layers), heads=heads,
                             head_dim=head_dim, mlp_dim=mlp)


def infer_perceiver(reader, base: PerceiverConfig, dim: int) -> PerceiverConfig:
  layers = keymap.layer_indices(reader.keys(), PR + 'layers.{i}.0.to_q.weight')
  if not layers:
    raise ConfigError('checkpoint has no perceiver.layers.{i} keys')
  inner = reader.shape(PR + f'layers.{layers[0]}.0.to_q.weight')[0]
  heads, head_dim = _heads(inner, base.head_dim, 'model.perceiver.heads')
  ff = reader.shape(PR + f'layers.{layers[0]}.1.1.weight')[0]
  return dataclasses.replace(base, depth=len(layers), heads=heads, head_dim=head_dim,
                             num_latents=reader.shape(PR + 'latents')[0], ff_mult=ff // dim)


SHAPE_FIELDS = {
    'vision': ('dim', 'patch_size', 'image_size', 'frames', 'depth', 'heads', 'head_dim', 'mlp_dim'),
    'perceiver': ('depth', 'heads', 'head_dim', 'num_latents', 'ff_mult'),
    'llama': ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads'),
}


def check_against(given: ModelConfig, inferred: ModelConfig, sections=('vision', 'perceiver', 'llama')):
  """Raises ConfigError listing every shape field where the given config and the checkpoint differ."""
  diffs = []
  for section in sections:
    for name in SHAPE_FIELDS[section]:
      a, b = getattr(getattr(given, section), name), getattr(getattr(inferred, section), name)
      if a != b:
        diffs.append(f'model.{section}.{name}: config {a}, checkpoint {b}')
  if diffs:
    raise ConfigError('the config does not match the checkpoint shapes: ' + '; '.join(diffs))


def infer_model_config(reader, given: ModelConfig | None = None, *, llama_heads: int | None = None,
                       size: str = 'converted') -> ModelConfig:
  """The ModelConfig of an official-layout checkpoint. With `given`, its non-shape fields are kept
  and its shape fields must agree with the checkpoint (else ConfigError listing the differences)."""
  base = given or ModelConfig(size=size)
  vision = infer_vision(reader, base.vision)
  perceiver = infer_perceiver(reader, base.perceiver, vision.dim)
  llama = infer_llama(reader, 'lang_model.', base.llama, heads=llama_heads)
  cfg = dataclasses.replace(base, vision=vision, perceiver=perceiver, llama=llama)
  if given is not None:
    check_against(given, cfg)
  validate_model(cfg)
  return cfg
