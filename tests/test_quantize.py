"""Qwix int8 post-training quantization: the weights are stored int8, the logits stay close to
full precision, and `radfm-jax generate --quantize int8` runs end to end."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import conftest_data as cd
from radfm_jax import api
from radfm_jax.infer import quantize as quant
from radfm_jax.infer.generate import generate_ids
from radfm_jax.models.radfm import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every Dense kernel of `tiny`: ViT (patch_proj + 6 per block), Perceiver (6), fc, decoder (7),
# lm_head.
KERNELS = {'vision/patch_proj', 'fc', 'llama/lm_head'} | {
    f'vision/blocks/{n}' for n in ('q', 'k', 'v', 'out', 'mlp_in', 'mlp_out')} | {
    f'perceiver/layers/{n}' for n in ('q', 'k', 'v', 'out', 'ff_in', 'ff_out')} | {
    f'llama/layers/{n}' for n in ('q', 'k', 'v', 'o', 'gate', 'up', 'down')}


@pytest.fixture(scope='module')
def models():
  model = create_model(cd.tiny_model(), seed=1)
  return model, quant.quantize(model, 'int8')


def _inputs():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 500, (2, 40)), jnp.int32)
  images = jnp.asarray(rng.random((2, 1, 3, 64, 64, 4)), jnp.float32)
  return tokens, images


def test_every_kernel_is_stored_int8_and_the_original_is_untouched(models):
  model, qmodel = models
  kinds = quant.quantized_kernels(qmodel)
  assert set(kinds) == {f'{k}/kernel' for k in KERNELS}
  assert set(kinds.values()) == {np.dtype('int8')}
  stacked = qmodel.llama.layers.gate.kernel.array
  assert stacked.qvalue[...].dtype == jnp.int8 and stacked.qvalue[...].shape == (2, 64, 128)
  assert stacked.scale[...].shape == (2, 1, 128)          # one scale per layer, output channel
  assert model.llama.layers.gate.kernel[...].dtype == jnp.float32      # a copy was quantized
  # int8 kernels: the stored bytes fall by ~3x (embeddings, norms and biases stay float32).
  assert quant.weight_bytes(qmodel) < 0.4 * quant.weight_bytes(model)


def test_int8_logits_are_close_to_full_precision(models):
  """Per-channel symmetric int8 rounds each weight by at most scale/2 = max|w|/254: RMS relative
  weight noise ~ 1/(127 sqrt(12)) * max/rms = 0.4% for these uniform inits (max/rms = sqrt 3).
  About 20 matmuls in sequence add that noise in quadrature (~2%), so the logits' relative L2
  error must stay under 3%; int4 (16x coarser) would be ~30%."""
  model, qmodel = models
  tokens, images = _inputs()
  full, q8 = np.asarray(model(tokens, images)), np.asarray(qmodel(tokens, images))
  rel = np.linalg.norm(q8 - full) / np.linalg.norm(full)
  assert 1e-4 < rel < 0.03, rel          # > 1e-4: the weights really changed
  # Both decode layer loops run the dequantized weights, with the same greedy tokens.
  mask = jnp.ones_like(tokens)
  scan = generate_ids(qmodel, tokens, mask, images, max_new_tokens=4, layer_loop='scan',
                      return_logits=True)
  unrolled = generate_ids(qmodel, tokens, mask, images, max_new_tokens=4, layer_loop='unrolled',
                          reuse_decode_view=False, return_logits=True)
  np.testing.assert_array_equal(scan.tokens, unrolled.tokens)
  np.testing.assert_allclose(scan.logits[:, 0], q8[:, -1], atol=1e-5)


def test_generate_cli_int8(models, tmp_path):
  model, _ = models
  api.save(model, str(tmp_path / 'ckpt'))
  (tmp_path / 'tok.model').write_bytes(cd.spm_proto())
  png = (np.random.default_rng(3).random((24, 20)) * 255).astype(np.uint8)
  cd.write_png(tmp_path / 'b.png', png)
  argv = ['generate', '--checkpoint', str(tmp_path / 'ckpt'), '--tokenizer',
          str(tmp_path / 'tok.model'), '--image', str(tmp_path / 'b.png'), '--prompt',
          'What is in <image>?', '--config.generate.max_new_tokens=4']
  env = dict(os.environ, PYTHONPATH=ROOT)

  def cli(*extra):
    out = subprocess.run([sys.executable, '-m', 'radfm_jax.cli', *argv, *extra], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout.strip(), out.stderr
  code, q8, err = cli('--quantize', 'int8')
  assert code == 0, err
  # The same answer as quantizing in Python the checkpoint the CLI loaded.
  from radfm_jax.infer import text
  loaded, tok, data_cfg = api.load_for_generation(str(tmp_path / 'ckpt'),
                                                  str(tmp_path / 'tok.model'))
  expected = text.generate(quant.quantize(loaded), tok, 'What is in <image>?',
                           [str(tmp_path / 'b.png')], data_cfg=data_cfg, max_new_tokens=4)
  assert q8 == expected
  code, _, err = cli('--quantize', 'int4')
  assert code == 2 and "argument --quantize: invalid choice: 'int4'" in err
