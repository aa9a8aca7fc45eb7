"""Generation, decoding and post-training quantization."""

# Post-training quantization modes (infer/quantize.py), here so that the CLI's parsers can list
# them without importing JAX: 'int8' int8 weights (weight-only), 'w8a8' the same int8 weights and
# int8 activations (quantized per row at every matmul, int32 sums).
QUANTIZE_MODES = ('int8', 'w8a8')
