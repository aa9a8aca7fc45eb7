"""The panel kernel (`generate.cpu_product='panels'`, radfm_jax/infer/panel_kernel.py): its
products against float64 NumPy at every row count and ragged shape, the packed layout, the
decode it serves against XLA's products, the build cache, and the one-line refusals."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from radfm_jax import sharding
from radfm_jax.config import MeshConfig, model_config
from radfm_jax.errors import UserError
from radfm_jax.infer import cpu_decode, panel_kernel
from radfm_jax.infer.generate import generate_ids, left_pad, panel_lanes
from radfm_jax.models.radfm import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def lanes():
  if panel_kernel.compiler() is None:      # the kernel is optional: 'auto' then uses XLA's
    pytest.skip('no C++ compiler here: the panel kernel cannot be built')
  return panel_kernel.load()


def test_pack_layout(lanes):
  """Panel p, feature k, lane j holds kernel[p * lanes + j, k]; lanes past `out` are zeros."""
  out, n_in = 2 * lanes + 3, 5
  kernel = np.arange(out * n_in, dtype=np.float32).reshape(out, n_in) + 1
  packed = np.asarray(panel_kernel.pack(jnp.asarray(kernel), lanes))
  assert packed.shape == (3, n_in, lanes)
  for p in range(3):
    for j in range(lanes):
      o = p * lanes + j
      want = kernel[o] if o < out else np.zeros(n_in, np.float32)
      np.testing.assert_array_equal(packed[p, :, j], want)


@pytest.mark.parametrize('rows', [1, 3, 4, 8, 9, 17, 70])
@pytest.mark.parametrize('out,n_in', [(37, 20), (64, 48), (1, 5), (4096, 64)])
def test_products_equal_the_float64_product(lanes, rows, out, n_in):
  """Every row count (the kernel takes rows in blocks of 4 or 8, the rest in a smaller block),
  an output count that leaves a partial panel, an odd panel count, a single output, and a
  weight split into many chunks over the thread pool (4096 x 64)."""
  rng = np.random.default_rng(rows * 1000 + out)
  kernel = rng.standard_normal((out, n_in)).astype(np.float32)
  x = rng.standard_normal((rows, n_in)).astype(np.float32)
  packed = panel_kernel.pack(jnp.asarray(kernel), lanes)
  got = np.asarray(jax.jit(panel_kernel.product, static_argnums=2)(packed, jnp.asarray(x), out))
  want = x.astype(np.float64) @ kernel.T.astype(np.float64)
  assert got.shape == (rows, out) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(n_in))


def test_a_chain_of_products_handed_between_lingering_helpers(lanes):
  """Dependent products back to back in one program, as a decode step runs them: the helper
  threads that finish one product wait for the next one posted and take it (no wake-up from
  XLA's pool), so every product after the first is served by helpers left from an earlier one.
  Each product against float64 NumPy, the chain repeated so helpers also cross calls."""
  rng = np.random.default_rng(5)
  shapes = [(4096, 64), (64, 4096), (2048, 64), (64, 2048), (4096, 64), (40, 4096)]
  kernels = [rng.standard_normal(s).astype(np.float32) / np.sqrt(s[1]) for s in shapes]
  packed = [panel_kernel.pack(jnp.asarray(k), lanes) for k in kernels]

  @jax.jit
  def chain(packed, x):
    outs = []
    for w, (out, _) in zip(packed, shapes):
      x = panel_kernel.product(w, x, out)
      outs.append(x)
    return outs

  for rows in (8, 1, 8):
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    want = x.astype(np.float64)
    for got, kernel in zip(chain(packed, jnp.asarray(x)), kernels):
      want = want @ kernel.T.astype(np.float64)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('rows', [1, 4, 8, 9])
@pytest.mark.parametrize('out,n_in', [(37, 20), (4096, 64), (1, 5)])
def test_int8_products_equal_the_float64_product(lanes, rows, out, n_in):
  """int8 panels (quantize='int8', weight-only) with one scale per output: rows @ (q * scale).T,
  at every row block, a partial and a single panel, and a weight split into many chunks; the
  int8 values span the whole range, -128 and 127 included."""
  rng = np.random.default_rng(rows * 1000 + out)
  q = rng.integers(-128, 128, (out, n_in)).astype(np.int8)
  q.flat[:2] = (-128, 127)
  scale = rng.uniform(1e-3, 2e-2, out).astype(np.float32)
  x = rng.standard_normal((rows, n_in)).astype(np.float32)
  packed = panel_kernel.pack(jnp.asarray(q), lanes)
  assert packed.dtype == jnp.int8
  got = np.asarray(jax.jit(panel_kernel.product, static_argnums=2)(
      packed, jnp.asarray(x), out, jnp.asarray(scale)))
  want = x.astype(np.float64) @ (q.astype(np.float64) * scale[:, None].astype(np.float64)).T
  assert got.shape == (rows, out) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(n_in))


def _attention64(q, k, v, keys, values, cached, own):
  """float64 softmax attention of one new token: q, k, v [b, n, h]; keys, values [b, n, S, h];
  cached [b, S], own [b] (attended); masked scores at -inf (rows with something attended)."""
  q, k, v, keys, values = (np.asarray(a, np.float64) for a in (q, k, v, keys, values))
  scores = np.concatenate([np.einsum('bnsh,bnh->bns', keys, q),
                           np.einsum('bnh,bnh->bn', k, q)[..., None]], -1) / np.sqrt(q.shape[-1])
  mask = np.concatenate([cached, own[:, None]], -1)[:, None, :]
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return (np.einsum('bns,bnsh->bnh', probs[..., :-1], np.nan_to_num(values) * mask[..., :-1, None])
          + probs[..., -1:] * v)


@pytest.mark.parametrize('head_dim_lanes', [1, 4, 8])
@pytest.mark.parametrize('batch,heads,slots,written', [(1, 3, 11, 7), (8, 12, 70, 70),
                                                       (2, 5, 40, 1), (3, 2, 9, 0)])
def test_cache_attention_equals_float64_attention_and_skips_unwritten_slots(
    lanes, head_dim_lanes, batch, heads, slots, written):
  """A one-token step's attention with the cache (`cache_attention`) against float64 NumPy, at
  head sizes of 1, 4 and 8 vectors (head_dim 64 and 128 on AVX-512), on the calling thread and
  split over the threads (from 2 MiB of keys and values: (8, 12, 70) at 4 and 8 vectors), with
  masked written slots (left padding), a row whose own key is masked, and no slot written yet.
  The unwritten slots hold NaN: never read."""
  hd = head_dim_lanes * lanes
  rng = np.random.default_rng(batch * 100 + slots + hd)
  q, k, v = (rng.standard_normal((batch, heads, hd)).astype(np.float32) for _ in range(3))
  keys, values = (rng.standard_normal((batch, heads, slots, hd)).astype(np.float32)
                  for _ in range(2))
  keys[:, :, written:] = values[:, :, written:] = np.nan
  cached = (rng.random((batch, slots)) < 0.7) & (np.arange(slots) < written)
  own = np.ones(batch, bool)
  if written and batch > 1:
    own[1] = False
    cached[1, 0] = True
  got = np.asarray(jax.jit(panel_kernel.cache_attention, static_argnames='scale')(
      *map(jnp.asarray, (q, k, v, keys, values, cached, own)), jnp.int32(written),
      scale=hd ** -0.5))
  assert got.shape == (batch, heads, hd) and got.dtype == np.float32
  np.testing.assert_allclose(got, _attention64(q, k, v, keys, values, cached, own),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('batch,heads,slots,written', [(6, 3, 70, 64), (8, 12, 200, 190)])
def test_cache_attention_skips_each_rows_masked_prefix(lanes, batch, heads, slots, written):
  """Left padding: the masked slots before a row's first attended one are not read (they hold
  NaN here, which would poison the sums), at prefixes of 0, 1, lanes - 1, lanes, lanes + 1 and
  40 slots and a row whose only attended key is its own, on the calling thread and split over
  the threads ((8, 12, 200) at head_dim 4 * lanes: > 2 MiB); the rest against float64 NumPy. A
  row with nothing attended reads every slot (its softmax is uniform over them: finite values
  there)."""
  hd = 4 * lanes
  rng = np.random.default_rng(slots)
  q, k, v = (rng.standard_normal((batch, heads, hd)).astype(np.float32) for _ in range(3))
  keys, values = (rng.standard_normal((batch, heads, slots, hd)).astype(np.float32)
                  for _ in range(2))
  keys[:, :, written:] = values[:, :, written:] = np.nan
  cached = np.broadcast_to(np.arange(slots) < written, (batch, slots)).copy()
  own = np.ones(batch, bool)
  prefixes = [0, 1, lanes - 1, lanes, lanes + 1, 40, written, written][:batch]
  for row, lead in enumerate(prefixes):
    cached[row, :lead] = False
    keys[row, :, :lead] = values[row, :, :lead] = np.nan
    if lead + 3 < written:
      cached[row, lead + 3] = False                   # a masked slot after the first attended one
  cached[batch - 1] = own[batch - 1] = False           # nothing attended: every slot read
  keys[batch - 1, :, :written], values[batch - 1, :, :written] = (
      rng.standard_normal((2, heads, written, hd)).astype(np.float32))
  got = np.asarray(jax.jit(panel_kernel.cache_attention, static_argnames='scale')(
      *map(jnp.asarray, (q, k, v, keys, values, cached, own)), jnp.int32(written),
      scale=hd ** -0.5))
  assert np.isfinite(got).all()
  attended = [a[:-1] for a in (q, k, v, np.nan_to_num(keys), values, cached, own)]
  np.testing.assert_allclose(got[:-1], _attention64(*attended), rtol=2e-5, atol=2e-5)
  uniform = (values[-1, :, :written].astype(np.float64).sum(1) + v[-1]) / (slots + 1)
  np.testing.assert_allclose(got[-1], uniform, rtol=2e-5, atol=2e-5)


def test_cached_attention_with_the_kernel(lanes):
  """`layers.cached_attention` with the kernel (one new token; the slots from `written` on
  masked and holding NaN) against its XLA form on the same cache with zeros there: the same
  values up to float32 rounding, a row with every key masked included (a uniform softmax over
  every allocated slot, as XLA's). It takes masks that are the same for every head, one row
  included; a per-head mask, or several new tokens, keep XLA's form (checked in the lowered
  programs)."""
  from radfm_jax.models import layers
  rng = np.random.default_rng(11)
  batch, heads, slots, hd, written = 3, 4, 24, 4 * lanes, 17
  q, k, v = (jnp.asarray(rng.standard_normal((batch, 1, heads, hd)), jnp.float32)
             for _ in range(3))
  cache_k, cache_v = (rng.standard_normal((batch, heads, slots, hd)).astype(np.float32)
                      for _ in range(2))
  cache_k[:, :, written:] = cache_v[:, :, written:] = 0
  cached_mask = (rng.random((batch, 1, 1, slots)) < 0.7) & (np.arange(slots) < written)
  cached_mask[2] = False
  new_mask = jnp.asarray(np.array([True, True, False])[:, None, None, None])
  nan_k, nan_v = cache_k.copy(), cache_v.copy()
  nan_k[:, :, written:] = nan_v[:, :, written:] = np.nan
  kernel = dict(cache_kernel=panel_kernel.cache_attention, written=jnp.int32(written))
  got = layers.cached_attention(q, k, v, jnp.asarray(nan_k), jnp.asarray(nan_v),
                                jnp.asarray(cached_mask), new_mask, **kernel)
  want = layers.cached_attention(q, k, v, jnp.asarray(cache_k), jnp.asarray(cache_v),
                                 jnp.asarray(cached_mask), new_mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got[2, 0]), (cache_v[2].sum(1) + np.asarray(v[2, 0]))
                             / (slots + 1), rtol=1e-5, atol=1e-6)

  def program(cached, q=q, k=k, v=v, rows=batch):
    return jax.jit(lambda *a: layers.cached_attention(*a, **kernel)).lower(
        q[:rows], k[:rows], v[:rows], jnp.asarray(cache_k[:rows]), jnp.asarray(cache_v[:rows]),
        cached[:rows], jnp.ones((1, 1, q.shape[1], q.shape[1]), bool)).as_text()
  assert panel_kernel.TARGET_ATTENTION in program(jnp.asarray(cached_mask))
  assert panel_kernel.TARGET_ATTENTION in program(jnp.asarray(cached_mask), rows=1)   # batch 1
  per_head = jnp.broadcast_to(jnp.asarray(cached_mask), (batch, heads, 1, slots))
  assert panel_kernel.TARGET_ATTENTION not in program(per_head)
  two = jnp.concatenate([q, q], 1)
  assert panel_kernel.TARGET_ATTENTION not in program(jnp.asarray(cached_mask), two, two, two)


@pytest.mark.parametrize('m', [1, 7, 16, 63, 64, 200, 32000])
def test_first_argmax_is_numpys(lanes, m):
  """The kernel's greedy argmax against `np.argmax` on every row: ties (the first one wins),
  NaN (the first NaN wins), infinities, all -inf, lengths below, at and past the vector blocks."""
  rng = np.random.default_rng(m)
  x = rng.standard_normal((12, m)).astype(np.float32)
  x[1] = np.round(x[1])
  x[2, rng.random(m) < 0.1] = np.nan
  x[3] = -np.inf
  x[4, rng.random(m) < 0.3] = np.inf
  x[5, -1] = 100.0
  x[6] = 0.0
  x[6, m // 2:] = -0.0
  x[7, -1] = np.nan
  got = np.asarray(jax.jit(panel_kernel.first_argmax)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.argmax(x, -1))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(panel_kernel.first_argmax(jnp.asarray(x.reshape(3, 4, m))),
                                np.argmax(x, -1).reshape(3, 4))


def test_refuses_other_dtypes(lanes):
  rows = jnp.ones((2, 8), jnp.float32)
  packed = panel_kernel.pack(jnp.ones((16, 8), jnp.bfloat16), lanes)
  with pytest.raises(ValueError, match='float32 panels .no scale. or int8 panels with scales, '
                     'got bfloat16 panels'):
    panel_kernel.product(packed, rows, 16)
  with pytest.raises(ValueError, match='float32 rows only, got bfloat16'):
    panel_kernel.product(panel_kernel.pack(jnp.ones((16, 8)), lanes), rows.astype(jnp.bfloat16),
                         16)
  int8 = panel_kernel.pack(jnp.ones((16, 8), jnp.int8), lanes)
  with pytest.raises(ValueError, match=r'int8 panels need float32 scales \[16\], got None'):
    panel_kernel.product(int8, rows, 16)


def test_cache_attention_and_argmax_refuse_other_dtypes_and_shapes(lanes):
  """One line each: bfloat16 caches, a non-int32 or non-scalar `written`, (from the kernel) a
  head size that is not a multiple of the lanes, and an argmax of other than float32 or over
  nothing."""
  q, keys = jnp.ones((1, 2, lanes)), jnp.ones((1, 2, 5, lanes))
  masks = (jnp.ones((1, 5), bool), jnp.ones((1,), bool))
  with pytest.raises(ValueError, match=r'^panel_kernel.cache_attention: float32 only, got '
                     r'bfloat16 keys$'):
    panel_kernel.cache_attention(q, q, q, keys.astype(jnp.bfloat16), keys, *masks, jnp.int32(5),
                                 1.0)
  with pytest.raises(ValueError, match=r'^panel_kernel.cache_attention: `written` must be an '
                     r'int32 scalar, got int32 \(1,\)$'):
    panel_kernel.cache_attention(q, q, q, keys, keys, *masks, jnp.ones((1,), jnp.int32), 1.0)
  odd, q_odd = jnp.ones((1, 2, 5, lanes + 1)), jnp.ones((1, 2, lanes + 1))
  with pytest.raises(Exception, match=r'cache_attention: expected q, k, v \[batch, heads, '):
    jax.block_until_ready(panel_kernel.cache_attention(q_odd, q_odd, q_odd, odd, odd, *masks,
                                                       jnp.int32(5), 1.0))
  assert panel_kernel.cache_fits(4 * lanes, lanes) and not panel_kernel.cache_fits(lanes + 1, lanes)
  assert not panel_kernel.cache_fits(64, 0)
  with pytest.raises(ValueError, match=r'^panel_kernel.first_argmax: float32 \[..., m > 0\], '
                     r'got int32 \(2, 3\)$'):
    panel_kernel.first_argmax(jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r'got float32 \(2, 0\)$'):
    panel_kernel.first_argmax(jnp.ones((2, 0)))


@pytest.fixture(scope='module')
def model():
  return create_model(model_config('tiny'), seed=3)


def _batch(model, seed=0):
  rng = np.random.default_rng(seed)
  vocab = model.cfg.llama.vocab_size
  block = [vocab] + [vocab + 2 + j for j in range(model.cfg.perceiver.num_latents)] + [vocab + 1]
  prompts = [[1] + block + rng.integers(3, 500, n).tolist() for n in (9, 2, 5)]
  tokens, mask = left_pad(prompts)
  v = model.cfg.vision
  images = jax.random.uniform(jax.random.key(seed), (3, 1, 3, v.image_size, v.image_size,
                                                     v.frames))
  return tokens, mask, images


def test_decode_with_panels_equals_xla_products(model, lanes):
  """The same greedy tokens and, at every step, the same logits up to float32 rounding as the
  decode with XLA's products: a batch of three left-padded prompts, prefill and steps."""
  tokens, mask, images = _batch(model)
  kw = dict(max_new_tokens=12, stop_ids=(), layer_loop='unrolled', return_logits=True)
  got = generate_ids(model, tokens, mask, images, cpu_product='panels', **kw)
  want = generate_ids(model, tokens, mask, images, cpu_product='xla', **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(got.logits, want.logits)    # another summation order: not XLA's


def test_int8_decode_with_panels_equals_xla_products(model, lanes):
  """quantize='int8' (weight-only) through the int8 panels: the view holds the int8 values and
  their scales (no float copy), and the decode gives XLA's tokens and, at every step, its logits
  up to float32 rounding ((x . q) * s here, x . (q * s) there)."""
  from radfm_jax.infer.quantize import quantize
  qmodel = quantize(model, 'int8')
  view = cpu_decode.DecodeView(qmodel.llama, lanes)
  for dense in (view.layers[0].q, view.layers[1].down, view.lm_head):
    assert dense.panels.dtype == jnp.int8 and dense.scale.shape == (dense.n_out,)
    assert not hasattr(dense, 'kernel')
  tokens, mask, images = _batch(qmodel, seed=1)
  kw = dict(max_new_tokens=12, stop_ids=(), layer_loop='unrolled', return_logits=True)
  got = generate_ids(qmodel, tokens, mask, images, cpu_product='panels', **kw)
  want = generate_ids(qmodel, tokens, mask, images, cpu_product='xla', **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_decode_view_holds_packed_kernels(model, lanes):
  """With lanes the view's projections hold the packed kernel and no [out, in] copy, and its
  layers the kernel's cache attention; without, neither."""
  view = cpu_decode.DecodeView(model.llama, lanes)
  q = view.layers[0].q
  assert not hasattr(q, 'kernel') and q.n_out == model.cfg.llama.hidden_size
  # ... and its layers take the kernel's attention with the cache (tiny: head_dim 16)
  assert all(layer.cache_kernel is panel_kernel.cache_attention for layer in view.layers)
  assert cpu_decode.DecodeView(model.llama, 0).layers[0].cache_kernel is None
  kernel = np.asarray(model.llama.layers.q.kernel[...][0]).reshape(q.panels.shape[1], -1).T
  np.testing.assert_array_equal(np.asarray(q.panels[...]),
                                np.asarray(panel_kernel.pack(jnp.asarray(kernel), lanes)))


def test_cpu_product_resolution(model, lanes, capsys):
  """'xla' packs nothing; 'panels' and 'auto' pack for the built kernel; a bfloat16 decoder is
  refused by 'panels' in one line and left to XLA by 'auto', which says why once."""
  assert panel_lanes(model, 'xla') == 0
  assert panel_lanes(model, 'panels') == panel_lanes(model, 'auto') == lanes
  half = create_model(model_config('tiny', compute_dtype='bfloat16'), seed=3)
  with pytest.raises(UserError, match=r"^generate.cpu_product='panels': the decoder computes in "
                     r"bfloat16 and the panel kernel is float32 only; set generate.cpu_product "
                     r"to 'xla'$"):
    panel_lanes(half, 'panels')
  capsys.readouterr()
  assert panel_lanes(half, 'auto') == 0 and panel_lanes(half, 'auto') == 0
  err = capsys.readouterr().err.splitlines()
  assert err == ["radfm-jax: generate.cpu_product='auto': the decoder computes in bfloat16 and "
                 "the panel kernel is float32 only; decoding with XLA:CPU's products"]


def test_off_cpu_panels_is_refused_and_auto_is_silent(model, monkeypatch, capsys):
  """On an accelerator (the platform the decode sees, patched: tests run on CPU) 'panels' is one
  line naming the platform, 'auto' and 'xla' pack nothing and say nothing (XLA's products are
  the accelerator's own), whatever the host's compiler."""
  from radfm_jax.infer import generate as generate_lib
  monkeypatch.setattr(generate_lib, '_platform', lambda: 'tpu')
  with pytest.raises(UserError, match=r"^generate.cpu_product='panels': the decoder runs on tpu; "
                     r"the panel kernel is a CPU kernel; set generate.cpu_product to 'xla'$"):
    panel_lanes(model, 'panels')
  capsys.readouterr()
  assert panel_lanes(model, 'auto') == panel_lanes(model, 'xla') == 0
  assert capsys.readouterr().err == ''


def test_auto_keeps_xla_for_a_sharded_decoder(lanes):
  """A decoder sharded over several devices keeps XLA's products under 'auto'; 'panels' still
  runs it (XLA gathers the weights for the call) with the same tokens."""
  if jax.device_count() < 2:
    pytest.skip('needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)')
  mesh = sharding.make_mesh(MeshConfig(ici=(('data', 1), ('fsdp', -1), ('tensor', 1))))
  model = create_model(model_config('tiny'), seed=3, mesh=mesh)
  assert max(len(a.sharding.device_set) for a in jax.tree.leaves(nnx.state(model.llama))) > 1
  assert panel_lanes(model, 'auto') == 0 and panel_lanes(model, 'panels') == lanes
  tokens, mask, images = _batch(model, 1)
  kw = dict(max_new_tokens=6, stop_ids=(), layer_loop='unrolled')
  np.testing.assert_array_equal(
      generate_ids(model, tokens, mask, images, cpu_product='panels', **kw).tokens,
      generate_ids(model, tokens, mask, images, cpu_product='xla', **kw).tokens)


def test_build_is_cached_and_atomic(lanes, tmp_path, monkeypatch):
  """A build lands under its key in $RADFM_KERNEL_CACHE with no partial file left; the next
  call finds it and builds nothing."""
  monkeypatch.setenv(panel_kernel.CACHE_ENV, str(tmp_path))
  path = panel_kernel.library_path()
  assert os.path.dirname(path) == str(tmp_path) and os.listdir(tmp_path) == [
      os.path.basename(path)]
  stamp = os.stat(path).st_mtime_ns
  assert panel_kernel.library_path() == path and os.stat(path).st_mtime_ns == stamp


def test_failed_builds_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
  """No compiler, a compiler that fails, a cache folder that cannot be made: one line each
  (KernelUnavailable, a UserError), and no file under the kernel's name."""
  monkeypatch.setenv(panel_kernel.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  with pytest.raises(panel_kernel.KernelUnavailable,
                     match=rf"^\$CXX '{tmp_path}/no-such-compiler' is not a command on PATH; "
                     r'expected a C\+\+ compiler \(unset CXX to use c\+\+, g\+\+ or clang\+\+ on '
                     r'PATH\)$'):
    panel_kernel.library_path()
  monkeypatch.setenv('CXX', "'g++")
  with pytest.raises(panel_kernel.KernelUnavailable,
                     match=r'^\$CXX "\'g\+\+": No closing quotation; expected a compiler command '
                     r"as a shell would split it, e.g. g\+\+ or 'ccache g\+\+'$"):
    panel_kernel.library_path()
  monkeypatch.setenv('CXX', 'true')      # exits 0 and writes nothing: no empty library cached
  with pytest.raises(panel_kernel.KernelUnavailable,
                     match=r'^building .*panel_product.cc with true wrote no library; expected a '
                     r'C\+\+ compiler \(\$CXX\)$'):
    panel_kernel.library_path()
  assert os.listdir(tmp_path / 'cache') == []
  failing = tmp_path / 'cxx'
  failing.write_text('#!/bin/sh\necho "cxx: error: out of licences" >&2\nexit 1\n')
  failing.chmod(0o755)
  monkeypatch.setenv('CXX', str(failing))
  with pytest.raises(panel_kernel.KernelUnavailable,
                     match=rf'^building .*panel_product.cc with {failing} failed: cxx: error: '
                     'out of licences$'):
    panel_kernel.library_path()
  assert os.listdir(tmp_path / 'cache') == []
  monkeypatch.delenv('CXX')
  (tmp_path / 'file').write_text('')
  monkeypatch.setenv(panel_kernel.CACHE_ENV, str(tmp_path / 'file' / 'cache'))
  with pytest.raises(panel_kernel.KernelUnavailable, match=r'^cannot write the kernel cache '):
    panel_kernel.library_path()


def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
  """A cached library cut short or overwritten under its name (dlopen crashes on a cut one) does
  not match the digest in its name: it is removed and built again, never loaded."""
  monkeypatch.setenv(panel_kernel.CACHE_ENV, str(tmp_path))
  path = panel_kernel.library_path()
  with open(path, 'rb') as f:
    whole = f.read()
  for damaged in (whole[:len(whole) // 2], b'garbage', b''):
    with open(path, 'wb') as f:
      f.write(damaged)
    assert panel_kernel.library_path() == path and os.listdir(tmp_path) == [
        os.path.basename(path)]
    with open(path, 'rb') as f:
      assert f.read() == whole


def test_auto_without_a_compiler_decodes_with_xla(tmp_path):
  """A host with no C++ compiler (a fresh process, $CXX naming none, an empty kernel cache):
  'auto' says so once on stderr and decodes with XLA's products; 'panels' is refused in one
  line."""
  script = (
      'import sys\n'
      'from radfm_jax.config import model_config\n'
      'from radfm_jax.errors import UserError\n'
      'from radfm_jax.infer.generate import panel_lanes\n'
      'from radfm_jax.models.radfm import create_model\n'
      "model = create_model(model_config('tiny'), seed=3)\n"
      "assert panel_lanes(model, 'auto') == 0 and panel_lanes(model, 'auto') == 0\n"
      'try:\n'
      "  panel_lanes(model, 'panels')\n"
      'except UserError as err:\n'
      '  print(err)\n')
  env = dict(os.environ, CXX=str(tmp_path / 'none'), RADFM_KERNEL_CACHE=str(tmp_path / 'k'),
             PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  done = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  why = (f"$CXX '{tmp_path}/none' is not a command on PATH; expected a C++ compiler (unset CXX "
         'to use c++, g++ or clang++ on PATH)')
  assert done.stderr.splitlines() == [
      f"radfm-jax: generate.cpu_product='auto': {why}; decoding with XLA:CPU's products"]
  assert done.stdout.splitlines() == [
      f"generate.cpu_product='panels': {why}; set generate.cpu_product to 'xla'"]
