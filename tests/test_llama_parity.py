"""Decoder parity: a random tiny HF `LlamaForCausalLM` loaded through the key map into our `Llama`
gives the same logits (every position, padded ones included) and round-trips back bit-exactly."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from radfm_jax.config import LlamaConfig  # noqa: E402
from radfm_jax.convert import engine, keymap  # noqa: E402
from radfm_jax.models.llama import Llama  # noqa: E402

HIDDEN, LAYERS, HEADS, MLP, VOCAB = 64, 2, 4, 128, 512


def _hf_model(seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      num_key_value_heads=HEADS, intermediate_size=MLP, vocab_size=VOCAB, rms_norm_eps=1e-6,
      rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
      attn_implementation='eager', torch_dtype=torch.float32)
  model = transformers.LlamaForCausalLM(cfg).float().eval()
  # HF inits norms to 1; random scales make a wrong norm mapping visible.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.uniform_(0.5, 1.5)
  return model


def _ours():
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP,
                    num_layers=LAYERS, num_heads=HEADS, max_position_embeddings=128,
                    rms_norm_eps=1e-6, rope_theta=10000.0)
  with nnx.use_eager_sharding(False):
    return Llama(cfg, rngs=nnx.Rngs(1))


@pytest.fixture(scope='module')
def pair():
  hf = _hf_model()
  ours = _ours()
  engine.load_state_dict(ours, keymap.llama_table(ours='', torch=''), hf.state_dict(),
                         skip=keymap.LLAMA_SKIP)
  return hf, ours


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, VOCAB, size=(2, 12))
  mask = np.ones((2, 12), np.int64)
  mask[1, 7:] = 0                         # right padding on the second row
  return ids, mask


def test_logits_match_hf(pair):
  hf, ours = pair
  ids, mask = _inputs()
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             position_ids=torch.arange(ids.shape[1])[None].expand(2, -1)).logits.numpy()
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  logits, _ = ours(ours.embed(jnp.asarray(ids)), positions, jnp.asarray(mask))
  logits = np.asarray(logits)
  assert logits.shape == ref.shape == (2, 12, VOCAB)
  assert np.abs(ref).max() > 0.1          # not a degenerate all-zero comparison
  # Real tokens and, with right padding, the padded positions too: HF still produces them (each
  # padded query attends to the real prefix and itself is masked as a key, exactly as ours).
  np.testing.assert_allclose(logits[0], ref[0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits[1, :7], ref[1, :7], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits[1, 7:], ref[1, 7:], atol=1e-4, rtol=1e-4)


def test_padding_does_not_change_real_tokens(pair):
  _, ours = pair
  ids, mask = _inputs()
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  full, _ = ours(ours.embed(jnp.asarray(ids)), positions, jnp.ones((2, 12), jnp.int32))
  padded, _ = ours(ours.embed(jnp.asarray(ids)), positions, jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(padded[1, :7]), np.asarray(full[1, :7]), atol=1e-5)


def test_roundtrip_bit_exact(pair):
  hf, ours = pair
  back = engine.state_dict_of(ours, keymap.llama_table(ours='', torch=''))
  ref = {k: v.numpy() for k, v in hf.state_dict().items() if 'inv_freq' not in k}
  assert set(back) == set(ref)
  for key, value in ref.items():
    assert back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_head_layout(pair):
  """q_proj rows (h d) land on our [hidden, heads, head_dim] kernel with the head outer."""
  hf, ours = pair
  w = hf.state_dict()['model.layers.1.self_attn.q_proj.weight'].numpy()   # (heads*hd, hidden)
  k = np.asarray(ours.layers.q.kernel[...])[1]                            # (hidden, heads, hd)
  hd = HIDDEN // HEADS
  np.testing.assert_array_equal(k[:, 2, 3], w[2 * hd + 3])
  o = hf.state_dict()['model.layers.0.self_attn.o_proj.weight'].numpy()   # (hidden, heads*hd)
  np.testing.assert_array_equal(np.asarray(ours.layers.o.kernel[...])[0][1, 5], o[:, hd + 5])


def test_mismatch_lists_keys(pair):
  hf, _ = pair
  sd = dict(hf.state_dict())
  del sd['model.layers.0.mlp.up_proj.weight']
  sd['model.extra.weight'] = torch.zeros(3)
  sd['model.norm.weight'] = torch.zeros(HIDDEN + 1)
  with pytest.raises(engine.CheckpointMismatchError) as err:
    engine.load_state_dict(_ours(), keymap.llama_table(ours='', torch=''), sd,
                           skip=keymap.LLAMA_SKIP)
  e = err.value
  assert e.missing == ['model.layers.0.mlp.up_proj.weight']
  assert e.unexpected == ['model.extra.weight']
  assert e.wrong_shape == [('model.norm.weight', (HIDDEN + 1,), (HIDDEN,))]
  assert 'model.layers.0.mlp.up_proj.weight' in str(e)
