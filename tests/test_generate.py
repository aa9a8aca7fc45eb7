"""KV-cache generation equals re-running the full forward; batching with left padding is exact."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conftest_data as cd
from radfm_jax.config import GenerateConfig, model_config
from radfm_jax.infer import cpu_decode
from radfm_jax.infer import generate as generate_lib
from radfm_jax.infer.generate import filter_logits, generate_ids, left_pad, panel_lanes
from radfm_jax.models import layers
from radfm_jax.models.llama import KVCache
from radfm_jax.models.radfm import create_model

IMG0 = 514  # <image0> at the tiny vocab (512 + 2)


@pytest.fixture(scope='module')
def model():
  return create_model(model_config('tiny'), seed=3)


def _prompt(rng, n_text, image_slot):
  ids = [1] + list(rng.integers(3, 500, n_text))
  block = [512] + [IMG0 + image_slot * 32 + j for j in range(32)] + [513]
  return ids[:2] + block + ids[2:]


def _images(seed, n):
  return jax.random.uniform(jax.random.key(seed), (1, n, 3, 64, 64, 8))


def _full_forward_greedy(model, prompt, images, steps):
  """Greedy tokens of the uncached full forward, re-run over the whole sequence for every new
  token: one jitted program over a buffer of the prompt + `steps` slots, the slots not yet
  written held at 0 (causal attention keeps them out of every earlier position's logits; were
  it to leak, the cached decode compared against this would disagree)."""
  forward = cd.jitted_forward(model)
  tokens = np.zeros((1, len(prompt) + steps), np.int32)
  tokens[0, :len(prompt)] = prompt
  for n in range(len(prompt), len(prompt) + steps):
    tokens[0, n] = int(jnp.argmax(forward(jnp.asarray(tokens), images)[0, n - 1]))
  return [int(t) for t in tokens[0, len(prompt):]]


@pytest.fixture(scope='module')
def greedy_case(model):
  """A 45-token prompt with one image and the 12 tokens the uncached full forward picks after
  it: the reference every decode loop below must reproduce (computed once for all of them)."""
  rng = np.random.default_rng(0)
  prompt = _prompt(rng, 10, 0)
  images = _images(1, 1)
  return prompt, images, _full_forward_greedy(model, prompt, images, 12)


@pytest.mark.parametrize('layer_loop,cache_chunk', [('scan', 64), ('unrolled', 64),
                                                    ('scan', 5), ('unrolled', 5)])
def test_cached_decode_matches_full_forward(model, greedy_case, layer_loop, cache_chunk):
  """Also with the cache growing in chunks of 5 slots (12 steps: three decode phases)."""
  prompt, images, want = greedy_case
  steps = len(want)
  tokens, mask = left_pad([prompt], length=len(prompt))
  out = generate_ids(model, tokens, mask, images, max_new_tokens=steps, stop_ids=(),
                     layer_loop=layer_loop, cache_chunk=cache_chunk)
  assert out.sequences()[0] == want
  assert out.lengths[0] == steps


@pytest.mark.parametrize('layer_loop', ['scan', 'unrolled'])
def test_greedy_decode_matches_the_originals_hf_generate(model, greedy_case, layer_loop):
  """The original generates with HF transformers' `LlamaForCausalLM.generate(inputs_embeds=...)`
  (docs/original.md): that decoder, built with our weights by benchmarks/generate.py (whose
  "x the original" figures it times), fed our spliced prompt, picks the same 12 greedy tokens
  from the same logits as our decode loop."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  bench = cd.import_benchmark('generate')
  prompt, images, want = greedy_case
  tokens, mask = left_pad([prompt], length=len(prompt))
  ours = generate_ids(model, tokens, mask, images, max_new_tokens=len(want), stop_ids=(),
                      layer_loop=layer_loop, return_logits=True)
  embeds = model.embed_inputs(jnp.asarray(tokens), jnp.asarray(images))
  hf = bench.original_generate(bench.original_decoder(model), embeds, len(want),
                               output_logits=True, return_dict_in_generate=True)
  assert hf.sequences[0, -len(want):].tolist() == ours.sequences()[0] == want
  hf_logits = np.stack([step[0].numpy() for step in hf.logits])      # [steps, vocab]
  assert np.abs(hf_logits).max() > 0.1
  np.testing.assert_allclose(ours.logits[0], hf_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('layer_loop', ['scan', 'unrolled'])
@pytest.mark.parametrize('cache_chunk', [4, 0])
@pytest.mark.parametrize('batched', [False, True])
def test_decode_logits_match_full_forward_at_every_step(model, layer_loop, cache_chunk, batched):
  """The logits of every decode step (the loop itself, `return_logits`) equal the uncached full
  forward's over the prompt and the tokens generated so far: 14 steps, with chunks of 4 slots the
  cache grows three times; batched, three prompts left-padded to one bucket. Tokens alone hide a
  cache written one slot off in some of these."""
  rng = np.random.default_rng(9)
  prompts = [_prompt(rng, n, 0) for n in ((9, 2, 5) if batched else (9,))]
  images = jnp.concatenate([_images(s, 1) for s in range(10, 10 + len(prompts))])
  tokens, mask = left_pad(prompts) if batched else left_pad(prompts, length=len(prompts[0]))
  steps = 14
  out = generate_ids(model, tokens, mask, images, max_new_tokens=steps, stop_ids=(),
                     layer_loop=layer_loop, cache_chunk=cache_chunk, return_logits=True)
  assert out.logits.shape == (len(prompts), steps, model.cfg.llama.vocab_size)
  full_tokens = np.concatenate([tokens, out.tokens], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
  positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
  full = np.asarray(model(jnp.asarray(full_tokens), images, attention_mask=jnp.asarray(full_mask),
                          positions=jnp.asarray(positions)))
  want = full[:, tokens.shape[1] - 1:tokens.shape[1] - 1 + steps]
  np.testing.assert_allclose(out.logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layer_loop', ['scan', 'unrolled'])
def test_cached_logits_match_full_forward(model, layer_loop):
  """Prefill + one-token steps through the KV cache (stacked + scan, or per-layer + the re-laid
  DecodeView weights) give the full forward's logits at every position."""
  rng = np.random.default_rng(4)
  prompt = _prompt(rng, 7, 0)
  extra = [int(t) for t in rng.integers(3, 500, 5)]
  images = _images(2, 1)
  full = np.asarray(model(jnp.asarray([prompt + extra], jnp.int32), images))[0]
  unrolled = layer_loop == 'unrolled'
  view = cpu_decode.DecodeView(model.llama) if unrolled else None
  if unrolled:   # kernels re-laid as [out, in] matrices, values unchanged
    q = view.layers[1].q
    assert isinstance(q, cpu_decode.OutFirstDense) and q.kernel.shape == (64, 64)
    np.testing.assert_array_equal(np.asarray(q.kernel[...]).T.reshape(64, 4, 16),
                                  np.asarray(model.llama.layers.q.kernel[...][1]))
  cache_type = cpu_decode.PerLayerCache if unrolled else KVCache
  cache = cache_type.zeros(model.cfg.llama, 1, len(prompt) + len(extra))
  n = len(prompt)
  decoder = view if unrolled else model.llama
  logits, cache = decoder(model.embed_inputs(jnp.asarray([prompt], jnp.int32), images),
                          jnp.arange(n)[None], jnp.ones((1, n), jnp.int32), cache)
  got = [np.asarray(logits[0])]
  for j, token in enumerate(extra[:-1]):
    logits, cache = decoder(decoder.embed(jnp.asarray([[token]], jnp.int32)),
                            jnp.asarray([[n + j]]), jnp.ones((1, 1), jnp.int32), cache)
    got.append(np.asarray(logits[0]))
  np.testing.assert_allclose(np.concatenate(got), full[:-1], rtol=1e-4, atol=1e-4)
  assert int(cache.index) == len(prompt) + len(extra) - 1


@pytest.mark.parametrize('rows', [1, 2, 8, cpu_decode.FEATURE_MAJOR_MAX_ROWS,
                                  cpu_decode.FEATURE_MAJOR_MAX_ROWS + 1])
def test_out_first_kernel_products_equal_the_plain_product(rows):
  """A re-laid [out, in] kernel gives the [in, out] product at every row count: plain below 2
  and above FEATURE_MAJOR_MAX_ROWS rows, feature-major (kernel @ rows^T) in between."""
  with nnx.use_eager_sharding(False):
    dense = layers.Dense((48,), (4, 20), ('embed',), ('heads', 'kv'), use_bias=True,
                         rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (rows, 1, 48))
  want = np.asarray(dense(x, jnp.float32))
  kernel = np.asarray(dense.kernel[...])
  out_first = cpu_decode.OutFirstDense(dense)
  np.testing.assert_array_equal(np.asarray(out_first.kernel[...]), kernel.reshape(48, 80).T)
  got = np.asarray(out_first(x, jnp.float32))
  assert got.shape == (rows, 1, 4, 20)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('new', [1, 3])
def test_cached_attention_equals_float64_softmax_attention(new):
  """`cached_attention` (one new token: the cached keys times a vector; several: the general
  product) against a float64 NumPy softmax over the unmasked cached slots and new tokens."""
  rng = np.random.default_rng(new)
  batch, heads, slots, hd = 2, 3, 11, 8
  q, k, v = (rng.standard_normal((batch, new, heads, hd)) for _ in range(3))
  cache_k, cache_v = (rng.standard_normal((batch, heads, slots, hd)) for _ in range(2))
  cached_mask = rng.random((batch, 1, 1, slots)) < 0.7
  cached_mask[:, ..., 0] = True
  new_mask = np.tril(np.ones((new, new), bool))[None, None]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = np.asarray(layers.cached_attention(f32(q), f32(k), f32(v), f32(cache_k), f32(cache_v),
                                           jnp.asarray(cached_mask), jnp.asarray(new_mask)))
  keys = np.concatenate([cache_k, k.transpose(0, 2, 1, 3)], axis=2)      # [b, n, slots+new, h]
  values = np.concatenate([cache_v, v.transpose(0, 2, 1, 3)], axis=2)
  mask = np.concatenate([np.broadcast_to(cached_mask, (batch, heads, new, slots)),
                         np.broadcast_to(new_mask, (batch, heads, new, new))], axis=-1)
  scores = np.einsum('bqnh,bnkh->bnqk', q, keys) / np.sqrt(hd)
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum('bnqk,bnkh->bqnh', probs, values)
  assert got.shape == (batch, new, heads, hd)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def _loop_ops(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(opcode, output dims) of every instruction the while loops of an optimized HLO module run,
  the computations they call (fusions) included."""
  comps, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$', line)
    if head and '=' not in line.split('(')[0]:
      current = comps.setdefault(head.group(1), [])
    elif current is not None:
      current.append(line)
  todo = [name for lines in comps.values() for line in lines
          for name in re.findall(r'body=%?([\w.\-]+)', line)]
  seen, ops = set(), []
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      todo += re.findall(r'(?:calls|body|condition|to_apply)=%?([\w.\-]+)', line)
      op = re.match(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\w+\[([\d,]*)\]\S*\s+([a-z][a-z0-9\-]*)\(',
                    line)
      if op:
        ops.append((op.group(2), tuple(int(d) for d in op.group(1).split(',') if d)))
  assert seen, 'no while loop found'
  return ops


def test_decode_loop_computes_no_rope_tables_and_copies_no_cache(model):
  """The batch-1 decode program's loops (compiled HLO): no sine / cosine (every step's RoPE
  tables are computed once, before the loop; inside it XLA:CPU fuses them into every layer's and
  head's rotation) and no transpose of the cached keys (a one-token step multiplies the cache by
  a vector; the general product copied each layer's keys at every step)."""
  rng = np.random.default_rng(7)
  prompt = _prompt(rng, 10, 0)
  sampling = GenerateConfig(max_new_tokens=12, stop_ids=(), layer_loop='unrolled',
                            cpu_product='xla')
  graphdef, state = nnx.split(model)
  view_graphdef, view_owned = cpu_decode.decode_view_state(model.llama, reuse=False)
  tokens = jnp.asarray([prompt], jnp.int32)
  hlo = generate_lib._compiled_decode(graphdef, view_graphdef, sampling, False).lower(
      state, view_owned, tokens, jnp.ones_like(tokens), _images(1, 1), jnp.ones((1, 1), bool),
      jax.random.key(0)).compile().as_text()
  ops = _loop_ops(hlo)
  assert not [op for op, _ in ops if op in ('sine', 'cosine')]
  head_dim = model.cfg.llama.head_dim
  assert not [(op, dims) for op, dims in ops
              if op == 'transpose' and len(dims) >= 2 and dims[-2] == head_dim
              and dims[-1] >= len(prompt)], 'a transpose of the cached keys in the decode loop'


def test_last_only_logits_are_the_last_position(model):
  rng = np.random.default_rng(5)
  prompt = jnp.asarray([_prompt(rng, 5, 0)], jnp.int32)
  embeds = model.embed_inputs(prompt, _images(3, 1))
  n = prompt.shape[1]
  args = (embeds, jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
  full, _ = model.llama(*args)
  last, _ = model.llama(*args, last_only=True)
  assert last.shape == (1, 1, full.shape[-1])
  # The head over one row and over all rows are two products: equal up to rounding (XLA's
  # kernels may round a [1, e] product differently from an [n, e] one).
  np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-6, atol=1e-7)


def test_decode_view_is_reused_until_the_weights_change():
  """The re-laid decoder made by one call serves the next while the weights are the same arrays;
  new weights (here a changed head) are re-laid, and the tokens follow them."""
  model = create_model(model_config('tiny'), seed=8)
  rng = np.random.default_rng(6)
  tokens, mask = left_pad([_prompt(rng, 6, 0), _prompt(rng, 3, 0)])
  images = jnp.concatenate([_images(7, 1), _images(8, 1)])
  kw = dict(max_new_tokens=6, stop_ids=(), layer_loop='unrolled')
  cpu_decode.clear_decode_view_cache()
  first = generate_ids(model, tokens, mask, images, **kw).sequences()
  kept = cpu_decode._VIEW_CACHE.owned
  assert kept is not None
  lanes = panel_lanes(model, GenerateConfig().cpu_product)   # the view's layout ('auto')
  _, hit = cpu_decode.decode_view_state(model.llama, lanes=lanes)   # same arrays: the kept view
  assert hit is kept and cpu_decode._VIEW_CACHE.owned is None
  assert generate_ids(model, tokens, mask, images, **kw).sequences() == first   # rebuilt
  assert generate_ids(model, tokens, mask, images, **kw).sequences() == first   # reused

  head = model.llama.lm_head.kernel
  head.set_value(jnp.roll(head[...], 1, axis=1))   # new array: every logit moves by one id
  changed = generate_ids(model, tokens, mask, images, **kw).sequences()
  fresh = generate_ids(model, tokens, mask, images, reuse_decode_view=False, **kw).sequences()
  scan = generate_ids(model, tokens, mask, images, **dict(kw, layer_loop='scan')).sequences()
  assert changed == fresh == scan
  assert changed != first


def test_batch_with_left_padding_equals_each_prompt_alone(model):
  rng = np.random.default_rng(1)
  prompts = [_prompt(rng, 4, 0), _prompt(rng, 19, 0), _prompt(rng, 9, 0)]
  images = jnp.concatenate([_images(s, 1) for s in (2, 3, 4)], axis=0)
  tokens, mask = left_pad(prompts)
  batched = generate_ids(model, tokens, mask, images, max_new_tokens=10, stop_ids=())
  for i, prompt in enumerate(prompts):
    t, m = left_pad([prompt], length=len(prompt))
    alone = generate_ids(model, t, m, images[i:i + 1], max_new_tokens=10, stop_ids=())
    assert batched.sequences()[i] == alone.sequences()[0]


def test_stop_ids_end_rows_and_pad_after(model):
  rng = np.random.default_rng(2)
  prompt = _prompt(rng, 6, 0)
  images = _images(5, 1)
  tokens, mask = left_pad([prompt], length=len(prompt))
  free = generate_ids(model, tokens, mask, images, max_new_tokens=8, stop_ids=()).sequences()[0]
  stop = free[3]
  out = generate_ids(model, tokens, mask, images, max_new_tokens=8, stop_ids=(stop,))
  first = free.index(stop)
  assert out.sequences()[0] == free[:first + 1]
  assert out.lengths[0] == first + 1
  assert np.all(out.tokens[0, first + 1:] == 0)


def test_sampling_is_seeded_and_respects_top_k(model):
  rng = np.random.default_rng(3)
  prompt = _prompt(rng, 6, 0)
  tokens, mask = left_pad([prompt], length=len(prompt))
  kw = dict(max_new_tokens=6, stop_ids=(), temperature=1.0, top_k=1)
  greedy = generate_ids(model, tokens, mask, _images(6, 1), max_new_tokens=6, stop_ids=())
  top1 = generate_ids(model, tokens, mask, _images(6, 1), rng=jax.random.key(7), **kw)
  assert top1.sequences() == greedy.sequences()  # top-k=1 sampling is greedy
  a = generate_ids(model, tokens, mask, _images(6, 1), rng=jax.random.key(1), max_new_tokens=6,
                   stop_ids=(), temperature=1.0)
  b = generate_ids(model, tokens, mask, _images(6, 1), rng=jax.random.key(1), max_new_tokens=6,
                   stop_ids=(), temperature=1.0)
  assert a.sequences() == b.sequences()


def test_tiny_temperature_samples_the_argmax():
  """A temperature of 1e-45 (a float32 denormal) or 1e-50 (0 in float32) passes validation; the
  logits divided by it must not overflow to inf (categorical then picked the first inf, id 0 and
  1 here, not the largest), with or without a top-k / top-p filter."""
  logits = jnp.asarray([[1.0, 3.0, 2.0, -1.0], [5.0, 0.0, 7.0, 6.9]], jnp.float32)
  for temperature in (1e-45, 1e-50, 1e-30):
    for top_k, top_p in ((0, 1.0), (3, 1.0), (0, 0.5)):
      sampling = GenerateConfig(temperature=temperature, top_k=top_k, top_p=top_p)
      for seed in range(4):
        got = generate_lib.choose_token(logits, jax.random.key(seed), sampling)
        assert got.tolist() == [1, 2], (temperature, top_k, top_p, seed)


def test_cache_limits_and_grow():
  assert generate_lib.cache_limits(40, 12, 5) == [45, 50, 52]
  assert generate_lib.cache_limits(40, 12, 0) == [52]
  assert generate_lib.cache_limits(40, 12, 64) == [52]
  cfg = model_config('tiny').llama
  cache = cpu_decode.PerLayerCache.zeros(cfg, 2, 6)
  cache = cache.replace(k=tuple(k + 1 for k in cache.k), v=tuple(v + 2 for v in cache.v),
                        mask=cache.mask.at[:, :3].set(True))
  grown = cache.grow(9)
  assert grown.max_len == 9 and grown.k[0].shape[-2] == 9 and grown.v[0].shape[-2] == 9
  np.testing.assert_array_equal(grown.k[1][..., :6, :], cache.k[1])
  np.testing.assert_array_equal(grown.v[1][..., :6, :], cache.v[1])
  assert float(jnp.abs(grown.k[1][..., 6:, :]).max()) == 0.0
  assert float(jnp.abs(grown.v[1][..., 6:, :]).max()) == 0.0
  assert grown.mask[:, :3].all() and not grown.mask[:, 3:].any()
  stacked = KVCache.zeros(cfg, 2, 6).grow(8)
  assert stacked.k.shape[-2] == 8 and stacked.v.shape[-2] == 8
  with pytest.raises(ValueError, match='shrink'):
    grown.grow(4)


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
  kept = np.isfinite(np.asarray(filter_logits(logits, 2, 1.0))) & (
      np.asarray(filter_logits(logits, 2, 1.0)) > -1e30)
  assert kept.tolist() == [[True, True, False, False]]
  nucleus = np.asarray(filter_logits(logits, 0, 0.7)) > -1e30
  assert nucleus.tolist() == [[True, True, False, False]]   # 0.5 < 0.7 <= 0.8
  nucleus = np.asarray(filter_logits(logits, 0, 0.5)) > -1e30
  assert nucleus.tolist() == [[True, False, False, False]]


def test_left_pad_rejects_right_padding(model):
  tokens = np.array([[1, 5, 0]], np.int32)
  with pytest.raises(ValueError, match='left padding'):
    generate_ids(model, tokens, np.array([[1, 1, 0]]), None, max_new_tokens=2)


def test_first_argmax_is_argmax_with_ties_nans_and_infinities():
  """`layers.first_argmax` (greedy decoding's choice) gives jnp.argmax's index: the first of
  tied maxima, the first NaN when any, infinities and signed zeros."""
  rng = np.random.default_rng(0)
  cases = [rng.standard_normal((3, 5, 1000)).astype(np.float32),
           rng.integers(-2, 3, (8, 64)).astype(np.float32),                    # many ties
           np.array([[0.0, -0.0, 0.0], [-0.0, 0.0, -1.0]], np.float32),
           np.array([[1.0, np.inf, 2.0, np.inf], [-np.inf] * 4, [1.0, np.nan, 5.0, np.nan],
                     [np.nan, np.inf, 0.0, 0.0]], np.float32)]
  for x in cases:
    got = jax.jit(layers.first_argmax)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))


def test_ids_outside_the_radfm_range_are_refused(model):
  """The splice would clamp an out-of-range id into its tables (another token, silently); the
  original raises. Text ids, the 2 marker ids and one image's latent ids are accepted, the next
  id and negative ids are one InputError naming the position."""
  from radfm_jax.errors import InputError
  vocab, latents = model.cfg.llama.vocab_size, model.cfg.perceiver.num_latents
  images = _images(1, 1)
  last = vocab + 2 + latents - 1                # the last image-token id of one image slot
  ok = np.array([[1, vocab, last, vocab + 1, 7]], np.int32)
  mask = np.ones_like(ok)
  assert generate_ids(model, ok, mask, images, max_new_tokens=1).tokens.shape == (1, 1)
  for bad, where in ((last + 1, 'tokens[0, 2]: id %d outside 0..%d' % (last + 1, last)),
                     (-3, 'tokens[0, 2]: id -3 outside 0..%d' % last)):
    tokens = ok.copy()
    tokens[0, 2] = bad
    with pytest.raises(InputError, match=re.escape(where)):
      generate_ids(model, tokens, mask, images, max_new_tokens=1)
  no_image = r'tokens\[0, 1\]: id %d outside 0\.\.%d.*0 here\)$' % (vocab + 2, vocab + 1)
  with pytest.raises(InputError, match=no_image):
    generate_ids(model, np.array([[1, vocab + 2]]), np.ones((1, 2), np.int32), None,
                 max_new_tokens=1)
