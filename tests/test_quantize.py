"""Qwix int8 post-training quantization: the weights are stored int8, the logits stay close to
full precision, and `radfm-jax generate --quantize int8` runs end to end; `w8a8` also quantizes
the activations per row, with int8 x int8 -> int32 products."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest_data as cd
from radfm_jax import api
from radfm_jax.infer import quantize as quant
from radfm_jax.infer import cpu_decode
from radfm_jax.infer.generate import generate_ids
from radfm_jax.models import layers
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


def _both_decode_loops(model, tokens, images):
  """4 greedy tokens and their logits from each decode layer loop (scan, unrolled)."""
  mask = jnp.ones_like(tokens)
  return [generate_ids(model, tokens, mask, images, max_new_tokens=4, layer_loop=loop,
                       reuse_decode_view=False, return_logits=True)
          for loop in ('scan', 'unrolled')]


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
  full, q8 = (np.asarray(cd.jitted_forward(m)(tokens, images)) for m in (model, qmodel))
  rel = np.linalg.norm(q8 - full) / np.linalg.norm(full)
  assert 1e-4 < rel < 0.03, rel          # > 1e-4: the weights really changed
  # Both decode layer loops run the dequantized weights, with the same greedy tokens.
  scan, unrolled = _both_decode_loops(qmodel, tokens, images)
  np.testing.assert_array_equal(scan.tokens, unrolled.tokens)
  np.testing.assert_allclose(scan.logits[:, 0], q8[:, -1], atol=1e-5)


@pytest.mark.parametrize('n', [1, 3])
def test_w8a8_product_matches_integer_reference(n):
  """`int8_rows_product` in both layouts (Dense's [in, out], the decode view's [out, in]), one row
  (computed as two) and several: each row quantized by its own absmax scale (Qwix's int8, scale
  absmax / 127.5), exact integer sums, both scales on the output; and the compiled program's
  product is an int8 x int8 -> int32 one."""
  import qwix
  rng = np.random.default_rng(n)
  # Rows of very different scales: each gets its own.
  rows = (rng.normal(size=(n, 48)) * np.array([1.0, 10.0, 0.1])[:n, None]).astype(np.float32)
  w = rng.normal(size=(48, 20)).astype(np.float32)
  kq = qwix.quantize(jnp.asarray(w), 'int8', channelwise_axes=(1,))
  assert kq.qvalue.dtype == jnp.int8 and kq.scale.shape == (1, 20)
  xq = qwix.quantize(jnp.asarray(rows), 'int8', channelwise_axes=(0,))
  np.testing.assert_allclose(np.asarray(xq.scale)[:, 0], np.abs(rows).max(1) / 127.5, rtol=1e-6)
  expected = ((np.asarray(xq.qvalue, np.int64) @ np.asarray(kq.qvalue, np.int64))
              * np.asarray(xq.scale, np.float64) * np.asarray(kq.scale, np.float64))
  got = layers.int8_rows_product(jnp.asarray(rows), kq)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6, atol=1e-6)
  kt = qwix.QArray(qvalue=kq.qvalue.T, scale=kq.scale.T, zero_point=None, qtype='int8')
  got_t = layers.int8_rows_product(jnp.asarray(rows), kt, kernel_first=True)
  np.testing.assert_allclose(np.asarray(got_t), expected, rtol=2e-6, atol=1e-6)
  # Not the float product: the rows were rounded (the float one differs by more than rounding).
  assert np.abs(expected - rows.astype(np.float64) @ w).max() > 1e-4
  hlo = jax.jit(lambda r: layers.int8_rows_product(r, kq)).lower(jnp.asarray(rows)).as_text()
  assert re.search(r'dot_general.*tensor<\d+x48xi8>.*tensor<48x20xi8>.*-> tensor<\d+x20xi32>',
                   hlo), hlo


def test_w8a8_quantizes_activations_and_both_decode_loops_agree(models):
  model, q8 = models
  w8 = quant.quantize(model, 'w8a8')
  assert quant.quantized_kernels(w8) == quant.quantized_kernels(q8)      # the same int8 weights
  tokens, images = _inputs()
  full, a8, w = (np.asarray(cd.jitted_forward(m)(tokens, images)) for m in (model, q8, w8))
  rel = np.linalg.norm(w - full) / np.linalg.norm(full)
  assert 1e-4 < rel < 0.03, rel
  # The activations really are rounded: w8a8 is not the weight-only model.
  assert np.linalg.norm(w - a8) / np.linalg.norm(full) > 1e-4
  view = cpu_decode.DecodeView(w8.llama)
  assert view.layers[0].down.qvalue[...].dtype == jnp.int8       # the decode view keeps int8
  assert view.layers[0].down.qvalue[...].shape == (64, 128)      # [out, in]
  scan, unrolled = _both_decode_loops(w8, tokens, images)
  np.testing.assert_array_equal(scan.tokens, unrolled.tokens)
  np.testing.assert_allclose(scan.logits[:, 0], w[:, -1], atol=1e-5)
  # Later steps: the same products up to the rounding of a row's int8 value that an fp32
  # difference upstream moves across a boundary (one step of 1/127 of the row's absmax).
  np.testing.assert_allclose(scan.logits, unrolled.logits, atol=0.05)


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
  code, w8, err = cli('--quantize', 'w8a8')
  assert code == 0, err
  assert w8 == text.generate(quant.quantize(loaded, 'w8a8'), tok, 'What is in <image>?',
                             [str(tmp_path / 'b.png')], data_cfg=data_cfg, max_new_tokens=4)
  code, _, err = cli('--quantize', 'int4')
  assert code == 2 and "argument --quantize: invalid choice: 'int4'" in err
