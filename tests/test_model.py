"""Golden values from docs/original.md sections 2-5 and an independent numpy reference of the vision
tower and Perceiver written from it (exact-erf GELU, LN eps 1e-5, keys from media+latents)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from radfm_jax.config import VisionConfig, model_config
from radfm_jax.models.radfm import abstract_model, count_params, create_model, splice_image_tokens
from radfm_jax.models.vit3d import ViT3D, patchify, position_rows

# docs/original.md section 2: input H x W x D -> rows used in the (row/col, depth) tables of the
# ViT (16 row/col entries, 128 depth entries).
POSITION_TABLE = [
    ((512, 512, 4), list(range(16)), [127]),
    ((512, 512, 8), list(range(16)), [63, 127]),
    ((256, 256, 4), list(range(1, 16, 2)), [127]),
    ((256, 256, 32), list(range(1, 16, 2)), list(range(15, 128, 16))),
    ((256, 256, 64), list(range(1, 16, 2)), list(range(7, 128, 8))),
    ((512, 512, 64), list(range(16)), list(range(7, 128, 8))),
    ((256, 256, 12), list(range(1, 16, 2)), [41, 83, 125]),
]


@pytest.mark.parametrize('shape,hw_rows,depth_rows', POSITION_TABLE)
def test_position_rows_match_reference_table(shape, hw_rows, depth_rows):
  h, w, d = shape
  assert position_rows(h // 32, 16).tolist() == hw_rows
  assert position_rows(w // 32, 16).tolist() == hw_rows
  assert position_rows(d // 4, 128).tolist() == depth_rows


def test_position_embedding_uses_strided_rows_in_hwd_order():
  cfg = VisionConfig(dim=12, depth=1, heads=2, head_dim=4, mlp_dim=8)
  with nnx.use_eager_sharding(False):
    vit = ViT3D(cfg, rngs=nnx.Rngs(0))
  pos = np.asarray(vit.position_embedding(8, 8, 3))           # a 256 x 256 x 12 input
  row, col, dep = (np.asarray(t[...]) for t in (vit.pos_row, vit.pos_col, vit.pos_dep))
  rows_hw, rows_d = list(range(1, 16, 2)), [41, 83, 125]
  for token, (a, b, c) in enumerate(np.ndindex(8, 8, 3)):     # d fastest
    want = np.concatenate([row[rows_hw[a]], col[rows_hw[b]], dep[rows_d[c]]])
    np.testing.assert_array_equal(pos[token], want)
  with pytest.raises(ValueError, match='exceed the position table'):
    position_rows(17, 16)


def test_position_tables_start_uniform_over_pos_init_scale():
  """uniform(0, 1) by default (the original's init); model.vision.pos_init_scale=s draws the same
  tables times s, and the rest of the tower is unchanged."""
  def tower(scale):
    cfg = VisionConfig(dim=12, depth=1, heads=2, head_dim=4, mlp_dim=8, pos_init_scale=scale)
    with nnx.use_eager_sharding(False):
      return ViT3D(cfg, rngs=nnx.Rngs(0))
  base, wide = tower(1.0), tower(3.0)
  for name in ('pos_row', 'pos_col', 'pos_dep'):
    a, b = np.asarray(getattr(base, name)[...]), np.asarray(getattr(wide, name)[...])
    assert 0.0 <= a.min() and a.max() < 1.0 and a.std() > 0.2
    np.testing.assert_allclose(b, 3.0 * a, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(base.patch_proj.kernel[...]),
                                np.asarray(wide.patch_proj.kernel[...]))


def test_patch_flatten_order_is_p1_p2_pf_c():
  c, h, w, d, p, pf = 3, 64, 32, 8, 16, 4
  code = np.arange(c * h * w * d, dtype=np.int64).reshape(c, h, w, d)
  patches = np.asarray(patchify(jnp.asarray(code[None]), p, pf))[0]
  grid = (h // p, w // p, d // pf)
  assert patches.shape == (np.prod(grid), p * p * pf * c)
  rng = np.random.default_rng(0)
  for _ in range(200):
    a, b, f = (rng.integers(n) for n in grid)
    p1, p2, q, ch = rng.integers(p), rng.integers(p), rng.integers(pf), rng.integers(c)
    token = (a * grid[1] + b) * grid[2] + f                   # (h, w, d), d fastest
    feature = ((p1 * p + p2) * pf + q) * c + ch              # (p1, p2, pf, c), c fastest
    assert patches[token, feature] == code[ch, a * p + p1, b * p + p2, f * pf + q]


def test_radfm_13b_parameter_count():
  _, state = abstract_model(model_config('radfm_13b'))
  assert count_params(state) == 13_123_822_336
  assert state['llama']['embed_tokens'].shape == (32000, 5120)
  assert model_config('radfm_13b').image_token_offset == 32002


def test_splice_gather_equals_one_hot_matmul():
  rng = np.random.default_rng(1)
  vocab, e, n_img = 50, 8, 64
  text = rng.normal(size=(vocab, e)).astype(np.float32)
  figure = rng.normal(size=(2, e)).astype(np.float32)
  images = rng.normal(size=(2, n_img, e)).astype(np.float32)
  tokens = rng.integers(0, vocab + 2 + n_img, (2, 30)).astype(np.int32)
  got = np.asarray(splice_image_tokens(jnp.asarray(tokens), jnp.asarray(text),
                                       jnp.asarray(figure), jnp.asarray(images)))
  for b in range(2):
    table = np.concatenate([text, figure, images[b]])         # the original's per-sample table
    one_hot = np.eye(len(table), dtype=np.float32)[tokens[b]]
    np.testing.assert_array_equal(got[b], one_hot @ table)


# ---------------------------------------------------------------------------------------------
# numpy reference (from docs/original.md sections 2-4), run on the model's own weights


def _ln(x, scale, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _mha(q_in, kv_in, wq, wk, wv):
  q = np.einsum('te,ehd->htd', q_in, wq)
  k = np.einsum('te,ehd->htd', kv_in, wk)
  v = np.einsum('te,ehd->htd', kv_in, wv)
  attn = _softmax(q @ k.transpose(0, 2, 1) * q.shape[-1] ** -0.5)
  return np.einsum('hqk,hkd->qhd', attn, v)


def _vit_ref(p, image, cfg):
  c, h, w, d = image.shape
  P, F = cfg.patch_size, cfg.frame_patch_size
  x = image.reshape(c, h // P, P, w // P, P, d // F, F).transpose(1, 3, 5, 2, 4, 6, 0)
  x = x.reshape((h // P) * (w // P) * (d // F), -1)
  x = _ln(x, p['patch_norm_in']['scale'], p['patch_norm_in']['bias'])
  x = x @ p['patch_proj']['kernel'] + p['patch_proj']['bias']
  x = _ln(x, p['patch_norm_out']['scale'], p['patch_norm_out']['bias'])
  rows = [position_rows(n, m) for n, m in zip((h // P, w // P, d // F), cfg.pos_rows)]
  pos = [np.concatenate([p['pos_row'][i], p['pos_col'][j], p['pos_dep'][k]])
         for i in rows[0] for j in rows[1] for k in rows[2]]
  x = x + np.stack(pos)
  blocks = p['blocks']
  for l in range(cfg.depth):
    b = jax.tree.map(lambda a: a[l], blocks)
    y = _ln(x, b['attn_norm']['scale'], b['attn_norm']['bias'])
    y = _mha(y, y, b['q']['kernel'], b['k']['kernel'], b['v']['kernel'])
    x = x + np.einsum('thd,hde->te', y, b['out']['kernel']) + b['out']['bias']
    y = _ln(x, b['mlp_norm']['scale'], b['mlp_norm']['bias'])
    y = _gelu(y @ b['mlp_in']['kernel'] + b['mlp_in']['bias'])
    x = x + y @ b['mlp_out']['kernel'] + b['mlp_out']['bias']
  return x


def _perceiver_ref(p, media, depth):
  lat = p['latents']
  for l in range(depth):
    b = jax.tree.map(lambda a: a[l], p['layers'])
    xm = _ln(media, b['norm_media']['scale'], b['norm_media']['bias'])
    lt = _ln(lat, b['norm_latents']['scale'], b['norm_latents']['bias'])
    y = _mha(lt, np.concatenate([xm, lt]), b['q']['kernel'], b['k']['kernel'], b['v']['kernel'])
    lat = np.einsum('thd,hde->te', y, b['out']['kernel']) + lat
    y = _ln(lat, b['ff_norm']['scale'], b['ff_norm']['bias'])
    lat = _gelu(y @ b['ff_in']['kernel']) @ b['ff_out']['kernel'] + lat
  return _ln(lat, p['norm']['scale'], p['norm']['bias'])


@pytest.fixture(scope='module')
def tiny():
  cfg = model_config('tiny')
  model = create_model(cfg, seed=1)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return cfg, model, params


def test_vision_and_perceiver_match_numpy_reference(tiny):
  cfg, model, params = tiny
  images = np.random.default_rng(2).random((2, 1, 3, 64, 32, 12)).astype(np.float32)
  got = np.asarray(model.encode_images(jnp.asarray(images)))        # [2, 32, hidden]
  for i in range(2):
    media = _vit_ref(params['vision'], images[i, 0].astype(np.float64), cfg.vision)
    latents = _perceiver_ref(params['perceiver'], media, cfg.perceiver.depth)
    want = latents @ params['fc']['kernel'] + params['fc']['bias']
    np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=2e-5)


def _tokens_for(cfg, images_per_sample, length=100):
  vocab = cfg.llama.vocab_size
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, vocab, (len(images_per_sample), length)).astype(np.int32)
  places = {}
  for b, n in enumerate(images_per_sample):
    start = 2
    for s in range(n):
      block = [vocab] + [vocab + 2 + s * 32 + j for j in range(32)] + [vocab + 1]
      tokens[b, start:start + len(block)] = block
      places[(b, s)] = start + 1
      start += len(block) + 3
  return tokens, places


def test_splice_places_image_k_tokens_at_its_placeholders(tiny):
  cfg, model, params = tiny
  vocab = cfg.llama.vocab_size
  tokens, places = _tokens_for(cfg, [2, 1])
  images = jax.random.uniform(jax.random.key(4), (2, 2, 3, 64, 64, 8))
  image_mask = jnp.asarray([[True, True], [True, False]])
  embeds = np.asarray(model.embed_inputs(jnp.asarray(tokens), images, image_mask))
  image_tokens = np.asarray(model.encode_images(images, image_mask))  # [2, 64, hidden]
  for (b, s), start in places.items():
    np.testing.assert_array_equal(embeds[b, start:start + 32], image_tokens[b, s * 32:(s + 1) * 32])
    np.testing.assert_array_equal(embeds[b, start - 1], params['figure_tokens'][0].astype(np.float32))
    np.testing.assert_array_equal(embeds[b, start + 32], params['figure_tokens'][1].astype(np.float32))
  text = tokens < vocab
  np.testing.assert_array_equal(embeds[text],
                                params['llama']['embed_tokens'][tokens[text]].astype(np.float32))


def test_padding_images_are_never_referenced(tiny):
  cfg, model, _ = tiny
  tokens, _ = _tokens_for(cfg, [2, 1])
  images = jax.random.uniform(jax.random.key(5), (2, 2, 3, 64, 64, 8))
  image_mask = jnp.asarray([[True, True], [True, False]])
  logits = model(jnp.asarray(tokens), images, image_mask=image_mask)
  noisy = images.at[1, 1].set(jax.random.normal(jax.random.key(6), images.shape[2:]) * 100)
  np.testing.assert_array_equal(np.asarray(logits),
                                np.asarray(model(jnp.asarray(tokens), noisy, image_mask=image_mask)))
  alone = model(jnp.asarray(tokens[1:]), images[1:, :1])                 # sample 1 with S = 1
  np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


def test_layer_norm_eps_on_near_constant_patches(tiny):
  """Air: near-constant patches (variance ~1e-5, that of the LayerNorm eps) make eps visible.
  The vision tower's first LayerNorm sees such patches directly, the Perceiver's media and latent
  norms see near-constant media and latents; uniform random images hide eps. Measured with eps
  1e-6: encode_images moves by 4e-3, the Perceiver by 0.8 (the tolerance is 1e-4)."""
  cfg, model, params = tiny
  rng = np.random.default_rng(7)
  images = (np.asarray([0.2, 0.7])[:, None, None, None, None, None]
            + 1e-2 * rng.random((2, 1, 3, 64, 32, 12))).astype(np.float32)
  got = np.asarray(model.encode_images(jnp.asarray(images)))
  for i in range(2):
    media = _vit_ref(params['vision'], images[i, 0].astype(np.float64), cfg.vision)
    latents = _perceiver_ref(params['perceiver'], media, cfg.perceiver.depth)
    want = latents @ params['fc']['kernel'] + params['fc']['bias']
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4)

  dim = cfg.vision.dim
  media = (0.3 + 1e-2 * rng.random((2, 24, dim))).astype(np.float32)
  latents = (-0.4 + 1e-2 * rng.random((cfg.perceiver.num_latents, dim))).astype(np.float32)
  perceiver = nnx.clone(model.perceiver)    # a copy: the fixture's model keeps its latents
  perceiver.latents.set_value(jnp.asarray(latents))
  got = np.asarray(perceiver(jnp.asarray(media)))
  ref_params = dict(params['perceiver'], latents=latents.astype(np.float64))
  for i in range(2):
    want = _perceiver_ref(ref_params, media[i].astype(np.float64), cfg.perceiver.depth)
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4)


def _eqns(jaxpr):
  """Every equation of a jaxpr and of its sub-jaxprs (scan bodies, custom_vjp functions, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)           # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          yield from _eqns(sub)


def _scan_lengths_and_dots(jaxpr) -> tuple[list[int], int]:
  """(the `length` of every scan, number of dot_generals) in a jaxpr and its sub-jaxprs."""
  eqns = list(_eqns(jaxpr))
  return ([e.params['length'] for e in eqns if e.primitive.name == 'scan'],
          sum(e.primitive.name == 'dot_general' for e in eqns))


def _logits_and_grads(model, tokens, images):
  """(logits, gradients of every parameter) of a small loss on `model`'s logits."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(jnp.asarray(tokens), images)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7]), logits

  # Jitted: one program per model (op by op the scan test took 57 s alone on 2 cores, 24 s jitted).
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def test_scan_layers_false_runs_the_same_parameters(tiny):
  """model.scan_layers=False loops over the same stacked parameters (one parameter tree, so
  checkpoints are interchangeable) and gives the scanned model's logits and gradients; the
  programs differ: one scan per tower (vision, Perceiver, decoder) vs none, every layer's
  matmuls written out."""
  cfg, model, _ = tiny
  looped = create_model(model_config('tiny', scan_layers=False), seed=1)
  assert not looped.llama.scan_layers and not looped.vision.scan_layers
  assert not looped.perceiver.scan_layers
  tokens, _ = _tokens_for(cfg, [1, 1], length=48)
  images = jax.random.uniform(jax.random.key(9), (2, 1, 3, 64, 32, 8))

  def program(m):
    graphdef, state = nnx.split(m)
    forward = lambda state: nnx.merge(graphdef, state)(jnp.asarray(tokens), images)   # noqa: E731
    return _scan_lengths_and_dots(jax.make_jaxpr(forward)(state).jaxpr)

  (scans, scanned_dots), (no_scans, looped_dots) = program(model), program(looped)
  assert sorted(scans) == sorted([cfg.vision.depth, cfg.perceiver.depth, cfg.llama.num_layers])
  assert no_scans == []
  # Each tower's layer body once vs once per layer (2 layers per tower in tiny), beside the 3
  # matmuls outside the towers' layers (patch projection, fc, lm_head).
  assert {cfg.vision.depth, cfg.perceiver.depth, cfg.llama.num_layers} == {2}
  assert looped_dots == 3 + 2 * (scanned_dots - 3)
  params, looped_params = (nnx.state(m, nnx.Param) for m in (model, looped))
  assert jax.tree.structure(params) == jax.tree.structure(looped_params)
  jax.tree.map(np.testing.assert_array_equal, params, looped_params)

  logits, grads = _logits_and_grads(model, tokens, images)
  looped_logits, looped_grads = _logits_and_grads(looped, tokens, images)
  np.testing.assert_allclose(np.asarray(looped_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
  for path, grad in jax.tree.leaves_with_path(grads):
    assert np.abs(np.asarray(grad)).max() > 0, path    # every parameter gets a gradient
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-5), looped_grads, grads)


def _count_primitives(jaxpr, name: str) -> int:
  """How many equations of primitive `name` a jaxpr and its sub-jaxprs hold."""
  return sum(e.primitive.name == name for e in _eqns(jaxpr))


@pytest.mark.parametrize('remat', [False, True])
def test_transposed_backward_product_gives_autodiffs_gradients(remat):
  """layers.transposed_backward_product: the forward is the plain product bit for bit, the input
  and kernel gradients those of JAX's own transpose rule (to float rounding), also rematerialised;
  its backward writes the input out transposed for the kernel gradient (one optimization
  barrier)."""
  from radfm_jax.models.layers import _flat_product, transposed_backward_product
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (2, 5, 48))
  kernel = jax.random.normal(keys[1], (48, 40))
  cotangent = jax.random.normal(keys[2], (2, 5, 40))

  def grads(product):
    product = jax.checkpoint(product) if remat else product
    out, vjp = jax.vjp(product, x, kernel)
    return out, *vjp(cotangent)

  (out, dx, dkernel), (want_out, want_dx, want_dkernel) = (
      jax.jit(grads, static_argnums=0)(p) for p in (transposed_backward_product, _flat_product))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
  np.testing.assert_allclose(np.asarray(dx), np.asarray(want_dx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dkernel), np.asarray(want_dkernel), rtol=1e-5, atol=1e-5)
  # against float64 numpy: dx = dy . kernel^T, dkernel = x^T . dy over all rows
  x64, k64, dy64 = (np.asarray(a, np.float64) for a in (x, kernel, cotangent))
  np.testing.assert_allclose(np.asarray(dx), dy64 @ k64.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dkernel),
                             x64.reshape(-1, 48).T @ dy64.reshape(-1, 40), rtol=1e-4, atol=1e-4)
  jaxpr = jax.make_jaxpr(grads, static_argnums=0)(transposed_backward_product).jaxpr
  assert _count_primitives(jaxpr, 'optimization_barrier') == 1
  plain = jax.make_jaxpr(grads, static_argnums=0)(_flat_product).jaxpr
  assert _count_primitives(plain, 'optimization_barrier') == 0


def test_dense_backward_transposed_gives_the_same_training_gradients(tiny):
  """model.dense_backward='transposed' (the `cpu` preset) against 'autodiff': set on every Dense
  of the model, the same logits bit for bit and the same gradients for every parameter (to float
  rounding); LoRA models keep 'autodiff' (tests/test_lora.py trains their adapters)."""
  cfg, model, _ = tiny
  assert cfg.dense_backward == 'transposed'
  plain = create_model(model_config('tiny', dense_backward='autodiff'), seed=1)
  from radfm_jax.models.layers import Dense

  def settings(m):
    return {d.dense_backward for _, d in nnx.iter_modules(m) if isinstance(d, Dense)}

  assert settings(model) == {'transposed'} and settings(plain) == {'autodiff'}
  tokens, _ = _tokens_for(cfg, [1, 1], length=48)
  images = jax.random.uniform(jax.random.key(9), (2, 1, 3, 64, 32, 8))

  logits, grads = _logits_and_grads(model, tokens, images)
  plain_logits, plain_grads = _logits_and_grads(plain, tokens, images)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain_logits))
  for path, grad in jax.tree.leaves_with_path(grads):
    assert np.abs(np.asarray(grad)).max() > 0, path
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6), grads, plain_grads)
