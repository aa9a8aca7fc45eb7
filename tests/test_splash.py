"""Splash attention (model.attention='splash'): the Pallas kernel, run in the Pallas interpreter on
CPU, against XLA attention on the decoder's causal + key-padding mask, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radfm_jax.models import layers, splash


def _inputs(batch=2, length=128, heads=2, head_dim=64):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim)) for key in keys)
  lengths = jnp.array([length, length - 37])       # second example right-padded
  key_mask = jnp.arange(length)[None] < lengths[:, None]
  pos = jnp.arange(length)
  # The decoder's training mask: causal & key padding, [batch, 1, len, len].
  mask = (pos[None, :] <= pos[:, None])[None, None] & key_mask[:, None, None, :]
  return q, k, v, mask, key_mask[:, :, None, None]


@pytest.mark.slow
def test_splash_matches_xla_attention_forward_and_grad():
  q, k, v, mask, real = _inputs()
  xla = lambda q, k, v: layers.attention(q, k, v, mask)
  pallas = lambda q, k, v: splash.causal_attention(q, k, v, mask, interpret=True)
  # Padded query rows differ by design (they attend padding only): compare real tokens.
  np.testing.assert_allclose(np.where(real, pallas(q, k, v), 0), np.where(real, xla(q, k, v), 0),
                             atol=1e-5)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)
  for g_pallas, g_xla in zip(jax.grad(loss(pallas), (0, 1, 2))(q, k, v),
                             jax.grad(loss(xla), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_pallas, g_xla, atol=1e-4)


def test_splash_dispatch_and_config():
  from radfm_jax.config import ConfigError, load_config
  cfg = load_config('configs/radfm.py:model=tiny', ['model.attention=splash'])
  assert cfg.model.attention == 'splash'
  with pytest.raises(ConfigError):
    load_config('configs/radfm.py:model=tiny', ['model.attention=flash'])
  # Without a mask (vision tower, resampler) 'splash' falls back to XLA attention.
  q, k, v, _, _ = _inputs(length=16)
  np.testing.assert_array_equal(layers.attention(q, k, v, implementation='splash'),
                                layers.attention(q, k, v))
  with pytest.raises(ValueError, match='multiple of 128'):
    splash.causal_attention(q, k, v, None)
