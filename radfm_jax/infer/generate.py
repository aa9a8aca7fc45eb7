"""Prefill + KV-cache decoding: greedy by default, temperature / top-k / top-p sampling.

    out = generate_ids(model, tokens, attention_mask, images, image_mask, max_new_tokens=200)

Prompts are left-padded to a shared length bucket, so one compiled program serves every batch
whose (batch, prompt bucket, image shape, max_new_tokens) match; the whole decode loop runs on
device inside one `jax.jit` (a `lax.while_loop` that ends when every row has stopped).

Positions are `cumsum(attention_mask) - 1`, as in HF `generate`; with no padding that is the
original's `arange(L)`. Generation stops on any id in `stop_ids`: the default (2, 1) stops on
`</s>` as well as the original's id 1 (a deliberate deviation; `stop_ids=(1,)` is exact parity).

`layer_loop` picks how the decoder runs: 'scan' over the model's stacked layers and a stacked
`KVCache` (accelerators), or 'unrolled' over `cpu_decode.DecodeView`, the decoder re-laid for
XLA:CPU, and a `cpu_decode.PerLayerCache` ('auto' = unrolled on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax.config import ConfigError, GenerateConfig
from radfm_jax.errors import InputError, UserError
from radfm_jax.infer import cpu_decode, panel_kernel
from radfm_jax.models.layers import first_argmax
from radfm_jax.models.llama import KVCache, rope_tables

PAD_ID = 0


@dataclasses.dataclass
class GenerateOutput:
  """tokens: int32 [batch, max_new_tokens] (PAD_ID after a row stops; the stop id is kept);
  lengths: int32 [batch] new tokens per row, the stop id included; logits (with
  `return_logits`): float32 [batch, max_new_tokens, vocab], those each new token was chosen from
  (meaningless from `lengths` on)."""
  tokens: np.ndarray
  lengths: np.ndarray
  logits: np.ndarray | None = None

  def sequences(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def bucket_length(length: int, multiple: int = 64) -> int:
  """Prompt-length bucket: the next multiple of `multiple` (bounds the number of compiles)."""
  return max(multiple, -(-length // multiple) * multiple)


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None, multiple: int = 64):
  """Token lists -> (tokens int32 [batch, length], attention_mask int32 [batch, length]),
  right-aligned so every prompt ends at the last column."""
  longest = max(len(p) for p in prompts)
  length = length or bucket_length(longest, multiple)
  if longest > length:
    raise ValueError(f'a prompt of {longest} tokens does not fit the length {length}')
  tokens = np.full((len(prompts), length), PAD_ID, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, length - len(prompt):] = prompt
      mask[row, length - len(prompt):] = 1
  return tokens, mask


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Top-k then nucleus (top-p) filtering of float32 logits [batch, vocab] (-inf outside)."""
  neg_inf = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_index = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return logits


def choose_token(logits: jax.Array, rng: jax.Array, sampling: GenerateConfig,
                 argmax=first_argmax) -> jax.Array:
  """float32 [batch, vocab] -> int32 [batch]. argmax: greedy's (`layers.first_argmax`; the
  CPU panel decode passes the kernel's `panel_kernel.first_argmax`, the same index)."""
  if sampling.temperature == 0.0:
    return argmax(logits)
  # Shifted by the row's maximum first (the distribution is unchanged): divided by a tiny
  # temperature, every positive logit would overflow to inf and categorical would pick the first
  # of them, not the largest. The maximum stays exactly 0, also where the temperature rounds to 0
  # in float32 (0 / 0 would be NaN).
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  scaled = jnp.where(shifted == 0, 0.0, shifted / sampling.temperature)
  logits = filter_logits(scaled, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _platform() -> str:
  """The platform the decode runs on ('cpu', 'gpu', 'tpu')."""
  return jax.devices()[0].platform


def _on_cpu() -> bool:
  return _platform() == 'cpu'


def cache_limits(prompt_len: int, max_new: int, chunk: int) -> list[int]:
  """KV cache sizes, one per decode phase: prompt_len + chunk, + 2 chunk, ... up to
  prompt_len + max_new (a single size with chunk 0). A phase's steps attend to, and read, only
  its size's slots; the cache is padded to the next size between phases."""
  total = prompt_len + max_new
  if chunk <= 0:
    return [total]
  return list(range(prompt_len + chunk, total, chunk)) + [total]


def _resolve_layer_loop(layer_loop: str) -> str:
  if layer_loop == 'auto':
    return 'unrolled' if _on_cpu() else 'scan'
  return layer_loop


_SAID_WHY: set[str] = set()


def panel_lanes(model, cpu_product: str) -> int:
  """The panel width the unrolled decode packs its weights for (`generate.cpu_product`), 0 for
  XLA's products. 'panels' raises UserError where the kernel cannot serve (not on CPU, not
  float32, or it does not build here); 'auto' then uses XLA's products and says why, once per
  reason (silently off CPU, and for a decoder sharded over several devices: the kernel takes
  whole arrays, so XLA would gather every weight to call it)."""
  if cpu_product == 'xla':
    return 0
  dtype = jnp.dtype(model.llama.compute_dtype)
  if not _on_cpu():
    if cpu_product == 'auto':
      return 0
    why = f'the decoder runs on {_platform()}; the panel kernel is a CPU kernel'
  elif dtype != jnp.float32:
    why = f'the decoder computes in {dtype.name} and the panel kernel is float32 only'
  elif cpu_product == 'auto' and any(len(leaf.sharding.device_set) > 1
                                     for leaf in jax.tree.leaves(nnx.state(model.llama))):
    return 0
  else:
    why = panel_kernel.unavailable_reason()
  if why is None:
    return panel_kernel.load()
  if cpu_product == 'panels':
    raise UserError(f"generate.cpu_product='panels': {why}; set generate.cpu_product to 'xla'")
  if why not in _SAID_WHY:
    _SAID_WHY.add(why)
    print(f"radfm-jax: generate.cpu_product='auto': {why}; decoding with XLA:CPU's products",
          file=sys.stderr)
  return 0


def _decode_loop(graphdef, view_graphdef, state, view_owned, tokens, attention_mask, images,
                 image_mask, rng, *, sampling: GenerateConfig, return_logits: bool = False):
  """The jitted prefill + decode loop. view_graphdef / view_owned: the unrolled path's re-laid
  decoder (`decode_view_state`), None for the scanned path. Returns (tokens, lengths,
  view_owned, logits [batch, max_new, vocab] or None): the view's arrays are donated and handed
  back, so the loop can carry them without a copy and the next call can reuse them."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens.shape
  max_new = sampling.max_new_tokens
  cache_dtype = model.compute_dtype
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
  unrolled = view_graphdef is not None
  limits = cache_limits(prompt_len, max_new, sampling.cache_chunk)
  cache_type = cpu_decode.PerLayerCache if unrolled else KVCache
  cache = cache_type.zeros(model.cfg.llama, batch, limits[0], cache_dtype)
  embeds = model.embed_inputs(tokens, images, image_mask)
  # The loop carries the view's own arrays (donated, so in place) or the whole state.
  decoder_state = view_owned if unrolled else state
  shared = cpu_decode.decode_view_shared(model.llama) if unrolled else None

  def decoder(decoder_state):
    # NNX variables are bound to the trace that made them, so the decoder is re-merged inside
    # the loop body from arrays.
    if unrolled:
      return cpu_decode.merge_decode_view(view_graphdef, decoder_state, shared)
    return nnx.merge(graphdef, decoder_state).llama

  logits, cache = decoder(decoder_state)(embeds, positions, attention_mask, cache, last_only=True)
  stop_ids = jnp.asarray(sampling.stop_ids, jnp.int32)
  # Step s's token sits at position positions[:, -1] + 1 + s. Every step's rotary tables are
  # computed here once: computed in the loop body, XLA fuses the sine / cosine into each
  # layer's and head's rotation (docs/performance.md).
  step_positions = positions[:, -1:] + 1 + jnp.arange(max_new)
  llama_cfg = model.cfg.llama
  step_rope = rope_tables(step_positions, llama_cfg.head_dim, llama_cfg.rope_theta)

  def cond(carry, end):
    step, _, _, done, _, _, _, _ = carry
    return (step < end) & ~jnp.all(done)

  def body(carry):
    step, cache, logits, done, out, rng, decoder_state, scores = carry
    step_decoder = decoder(decoder_state)
    rng, key = jax.random.split(rng)
    argmax = panel_kernel.first_argmax if unrolled and step_decoder.lm_head.lanes else first_argmax
    token = jnp.where(done, PAD_ID, choose_token(logits, key, sampling, argmax))
    out = out.at[:, step].set(token)
    if scores is not None:
      scores = scores.at[:, step].set(logits)
    done = done | jnp.isin(token, stop_ids)
    position, *rope = (jax.lax.dynamic_slice_in_dim(a, step, 1, axis=1)
                       for a in (step_positions, *step_rope))
    step_logits, cache = step_decoder(step_decoder.embed(token[:, None]), position,
                                      jnp.ones((batch, 1), jnp.int32), cache, rope=tuple(rope))
    return step + 1, cache, step_logits[:, -1], done, out, rng, decoder_state, scores

  out = jnp.full((batch, max_new), PAD_ID, jnp.int32)
  carry = (jnp.zeros((), jnp.int32), cache, logits[:, -1], jnp.zeros((batch,), bool), out, rng,
           decoder_state,
           jnp.zeros(out.shape + logits.shape[-1:]) if return_logits else None)
  for limit in limits:
    # Steps while the written slots fit `limit`: step s writes slot prompt_len + s.
    carry = carry[:1] + (carry[1].grow(limit),) + carry[2:]
    carry = jax.lax.while_loop(functools.partial(cond, end=min(limit - prompt_len, max_new)),
                               body, carry)
  step, _, _, _, out, _, decoder_state, scores = carry
  stopped = jnp.isin(out, stop_ids)
  first_stop = jnp.argmax(stopped, axis=1)
  lengths = jnp.where(stopped.any(axis=1), first_stop + 1, step)
  return out, lengths, (decoder_state if unrolled else None), scores


@functools.lru_cache(maxsize=64)
def _compiled_decode(graphdef, view_graphdef, sampling: GenerateConfig, return_logits: bool):
  # One jitted function per (model structure, sampling); jax.jit then caches one executable per
  # input shape bucket.
  options = cpu_decode.COMPILER_OPTIONS if _on_cpu() else None
  return jax.jit(functools.partial(_decode_loop, graphdef, view_graphdef, sampling=sampling,
                                   return_logits=return_logits),
                 donate_argnums=(1,), compiler_options=options)


def _check_sampling_for(model, sampling: GenerateConfig):
  """ConfigError naming the generate field that this model could never act on: a stop id past
  its vocabulary (never emitted: the run would never stop on it), the panel kernel's products
  asked for with the scanned layer loop (which multiplies with XLA's)."""
  vocab = model.cfg.llama.vocab_size
  past = [i for i in sampling.stop_ids if i >= vocab]
  if past:
    raise ConfigError(f'config field generate.stop_ids={list(sampling.stop_ids)}: {past[0]} is '
                      f'past the model\'s vocabulary of {vocab} ids, which it never emits; '
                      f'expected ids < {vocab}')
  if sampling.cpu_product == 'panels' and sampling.layer_loop == 'scan':
    raise ConfigError("config field generate.cpu_product='panels': the panel kernel serves the "
                      "unrolled layer loop; expected generate.layer_loop='unrolled' (or 'auto' "
                      "on a CPU) with it, or cpu_product 'auto' / 'xla'")


def _check_ids(model, tokens: np.ndarray, images: int | None):
  """InputError unless every id is a RadFM id: text ids below the vocabulary, the 2 image-marker
  ids, then `images * num_latents` image-token ids. The splice clamps ids into its tables (a
  gather under jit cannot raise), so an id out of range would be embedded as another token;
  the original raises on it."""
  vocab = model.cfg.llama.vocab_size
  limit = vocab + 2 + (images or 0) * model.cfg.perceiver.num_latents
  if tokens.size and (tokens.min() < 0 or tokens.max() >= limit):
    row, col = np.argwhere((tokens < 0) | (tokens >= limit))[0]
    raise InputError(f'tokens[{row}, {col}]: id {int(tokens[row, col])} outside 0..{limit - 1}; '
                     f'expected RadFM ids (text ids < {vocab}, then 2 image-marker ids and '
                     f'{model.cfg.perceiver.num_latents} image-token ids per image slot, '
                     f'{images or 0} here)')


def generate_ids(model, tokens, attention_mask, images=None, image_mask=None, *,
                 sampling: GenerateConfig | None = None, rng: jax.Array | None = None,
                 reuse_decode_view: bool = True, return_logits: bool = False,
                 **sampling_overrides) -> GenerateOutput:
  """Generates for a left-padded batch.

  tokens, attention_mask: int32 [batch, prompt_len] (left padding); images: float32
  [batch, images, 3, H, W, D] or None; image_mask: bool [batch, images]. With the unrolled layer
  loop the re-laid decoder weights are kept for the next call unless `reuse_decode_view` is False
  (`cpu_decode.decode_view_state`). `sampling` defaults to `GenerateConfig()`, its fields
  overridden by `sampling_overrides`. `return_logits` also returns the logits of every step
  (`GenerateOutput.logits`).
  """
  sampling = dataclasses.replace(sampling or GenerateConfig(), **sampling_overrides)
  sampling = dataclasses.replace(sampling, stop_ids=tuple(sampling.stop_ids),
                                 layer_loop=_resolve_layer_loop(sampling.layer_loop))
  _check_sampling_for(model, sampling)
  _check_ids(model, np.asarray(tokens), None if images is None else np.shape(images)[1])
  tokens = jnp.asarray(tokens, jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if np.any(np.asarray(attention_mask)[:, -1] == 0):
    raise ValueError('attention_mask: expected left padding (every prompt ends at the last column)')
  if images is not None:
    # device_put, not jnp.asarray: at batch 8 of the `bench` image (100 MB) it is ~35 ms faster
    # on CPU, and it aliases a 64-byte-aligned host array instead of copying it.
    images = jax.device_put(images if isinstance(images, jax.Array) else np.asarray(images))
    image_mask = (jnp.ones(images.shape[:2], bool) if image_mask is None
                  else jnp.asarray(image_mask, bool))
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  view_graphdef = view_owned = None
  lanes = 0
  if sampling.layer_loop == 'unrolled':
    lanes = panel_lanes(model, sampling.cpu_product)
    view_graphdef, view_owned = cpu_decode.decode_view_state(model.llama,
                                                             reuse=reuse_decode_view, lanes=lanes)
  out, lengths, view_owned, logits = _compiled_decode(graphdef, view_graphdef, sampling,
                                                      return_logits)(
      state, view_owned, tokens, attention_mask, images, image_mask, rng)
  if view_graphdef is not None and reuse_decode_view:
    cpu_decode.keep_decode_view(model.llama, view_graphdef, view_owned, lanes)
  return GenerateOutput(tokens=np.asarray(out), lengths=np.asarray(lengths),
                        logits=None if logits is None else np.asarray(logits))
