"""Post-training weight quantization for inference, with Qwix (`radfm-jax generate --quantize`).

    qmodel = quantize(model, 'int8')        # a copy: every matmul kernel int8 + per-channel scales
    quantized_kernels(qmodel)               # {'llama/layers/q/kernel': dtype('int8'), ...}

`qwix.quantize_model(model, qwix.PtqProvider(rules), tokens, images)` runs the model once on a
small dummy input; each `jax.lax.dot_general` whose right operand is a parameter (every `Dense`
kernel: the ViT, Perceiver, fc, decoder projections and lm_head) has that parameter replaced by a
Qwix `QArray` (symmetric int8 values, one float scale per output channel, axes chosen by Qwix from
the dimension numbers). This works through the scanned layers (`nnx.scan`): the stacked kernels
get stacked int8 values and scales. The token embedding, norms, position tables, latents and
biases stay in their dtype (gathers and adds, no matmul; < 3% of the 13B bytes).

`'int8'` is weight-only: activations are not quantized. `layers.cast` dequantizes a kernel at its
use (int8 * scale, then the compute dtype), so both decode layer loops (scan, unrolled) and the
prefill run the same arithmetic, and XLA fuses the dequantization into the consumer; the stored
weights, and therefore the HBM they occupy, are int8. The CPU decode with the panel kernel
(`generate.cpu_product`, 'auto' on a CPU) keeps them int8 too: each product streams the int8
values, widens them to float32 in registers and scales each output's sum ((x . q) * s, equal to
x . (q * s) up to float32 rounding), a quarter of the fp32 bytes per step.

`'w8a8'` stores the same int8 weights and also quantizes the activations: at every matmul
(`layers.int8_rows_product`, in `Dense` and in the CPU decode view alike) each row (one token's
input) is scaled to symmetric int8 by its own absmax, the product runs int8 x int8 with int32 sums,
and both scales are applied to the output (Qwix's `quantize` and fast `dot_general`; the rows are
quantized in our `Dense` rather than by a Qwix activation rule, since generation runs the decoder
outside the model's `__call__`, where Qwix intercepts nothing). A deviation from the original's
numerics (logits ~1% from fp32 at the test config, against ~0.8% for 'int8'), chosen for speed
where the panel kernel does not serve: XLA:CPU compiles the int8 products to YNNPACK fusions, a
`bench` decode step ~2x the fp32 rate; with the panel kernel 'int8' is faster still
(docs/performance.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax.infer import QUANTIZE_MODES as MODES
from radfm_jax.models.layers import Dense


def _rules(mode: str):
  import qwix
  if mode not in MODES:
    raise ValueError(f'quantize={mode!r}: expected one of {list(MODES)}')
  return [qwix.QuantizationRule(module_path='.*', weight_qtype='int8')]


def dummy_inputs(model_cfg):
  """(tokens int32 [1, 8], images float32 [1, 1, 3, p, p, f]): the smallest input that runs every
  matmul once (one patch of the vision tower)."""
  v = model_cfg.vision
  return (jnp.zeros((1, 8), jnp.int32),
          jnp.zeros((1, 1, v.channels, v.patch_size, v.patch_size, v.frame_patch_size),
                    jnp.float32))


def quantize(model, mode: str = 'int8'):
  """A quantized copy of `model` (the original is unchanged); see the module docstring."""
  import qwix
  provider = qwix.PtqProvider(_rules(mode))
  tokens, images = dummy_inputs(model.cfg)
  # Qwix quantizes the kernel as the dot sees it and keeps its logical axes, one per dimension:
  # the multi-dimensional dot (layers.Dense.flat_matmul=False), as QLoRA does; the original model
  # gets its own setting back.
  dense = [m for _, m in nnx.iter_modules(model) if isinstance(m, Dense)]
  before = [m.flat_matmul for m in dense]
  for m in dense:
    m.flat_matmul = False
  try:
    out = qwix.quantize_model(model, provider, tokens, images)
  finally:
    for m, flat in zip(dense, before):
      m.flat_matmul = flat
  # Generation calls the decoder outside the model's __call__, where Qwix intercepts nothing:
  # every Dense dequantizes its int8 kernel at use (layers.Dense, layers.value).
  for _, module in nnx.iter_modules(out):
    if isinstance(module, Dense):
      module.dequantize_at_use, module.flat_matmul = True, False
      module.int8_activations = mode == 'w8a8'
  return out


def abstract_quantized(model_cfg, mode: str = 'int8'):
  """(graphdef, abstract state) of the quantized model without allocating anything (for
  ahead-of-time compiles): the quantization traced on abstract weights."""
  from radfm_jax.models.radfm import RadFM

  def make():
    with nnx.use_eager_sharding(False):
      return quantize(RadFM(model_cfg, rngs=nnx.Rngs(0)), mode)
  return nnx.split(nnx.eval_shape(make))


def quantized_kernels(model) -> dict[str, np.dtype]:
  """'path/to/kernel' -> dtype of its stored values, for every quantized kernel."""
  out = {}
  for path, leaf in nnx.to_flat_state(nnx.state(model)):
    keys = [str(k) for k in path]
    if keys[-1] == 'qvalue':
      out['/'.join(keys[:keys.index('array')])] = np.dtype(leaf[...].dtype)
  return out


def weight_bytes(model) -> int:
  """Bytes of every parameter array as stored (int8 values count one byte)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(nnx.state(model)))


__all__ = ['MODES', 'abstract_quantized', 'dummy_inputs', 'quantize', 'quantized_kernels',
           'weight_bytes']
