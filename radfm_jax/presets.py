"""Named model sizes and hardware presets, as data (so a wheel install has them).

Each entry is a nested dict of only the fields that differ from the dataclass defaults in
`radfm_jax/config.py` (the official RadFM-13B sizes, float32, FSDP over every device), so
`radfm_13b` is empty. `select(model, mesh)` merges one of each; experiment files
(`configs/radfm.py`) start from it. A size also sets the data fields that follow from its vision
tower and context (2D / 3D image sizes, depth buckets up to its frames, text lengths up to its
positions), so every size validates as it stands.

Sizes: `tiny` (tests), `small` (CPU demo), `bench` (CPU benchmark), `radfm_1b` (~1B parameters,
accelerator MFU runs), `radfm_13b` (the official checkpoint, docs/original.md sections 2-6). The small
ones shrink every width and depth but keep the RadFM structure (patch layout, 32 latents,
image-token id layout).

Hardware: `ici` and `dcn` are lists of (axis, size) over the axes `data`, `fsdp`, `tensor`; one -1
in each fills what the device count leaves. `dcn` is the across-slice / across-node part
(multi-slice TPU, multi-node GPU); the mesh is hybrid whenever a `dcn` size is above 1. `topology`
names a TPU topology for ahead-of-time compiles from a CPU host (`radfm-jax aot`); `hbm_gib` is
the usable memory per chip that the fit check compares against.
"""

from __future__ import annotations

import copy


def _text_lengths(max_positions: int) -> list[int]:
  return [n for n in (256, 512, 1024, 2048) if n <= max_positions]


MODEL_SIZES = {
    'tiny': {
        'model': {
            'vision': dict(image_size=64, frames=16, patch_size=16, dim=48, depth=2, heads=4,
                           head_dim=8, mlp_dim=96),
            'perceiver': dict(depth=2, heads=4, head_dim=8),
            'llama': dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, max_position_embeddings=1024),
        },
        'data': dict(image_size_2d=64, image_size_3d_single=32, depth_buckets=[4, 8, 12, 16],
                     text_lengths=_text_lengths(1024)),
    },
    'small': {
        'model': {
            'vision': dict(image_size=128, frames=64, patch_size=16, dim=192, depth=4, heads=4,
                           head_dim=48, mlp_dim=512),
            'perceiver': dict(depth=2, heads=4, head_dim=48),
            'llama': dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4,
                          num_heads=4, max_position_embeddings=1024),
        },
        'data': dict(image_size_2d=128, image_size_3d_single=64, text_lengths=_text_lengths(1024)),
    },
    'bench': {
        'model': {
            'vision': dict(image_size=256, frames=64, dim=384, depth=4, heads=6, mlp_dim=1536),
            'perceiver': dict(depth=2, heads=6),
            'llama': dict(hidden_size=768, intermediate_size=2048, num_layers=6, num_heads=12),
        },
        'data': dict(image_size_2d=256, image_size_3d_single=128),
    },
    'radfm_1b': {
        'model': {
            'llama': dict(hidden_size=2048, intermediate_size=5504, num_layers=16, num_heads=16),
        },
    },
    'radfm_13b': {},
}

_ACCELERATOR = {'model': {'compute_dtype': 'bfloat16'}}


def _accelerator(hbm_gib: float, topology: str = '', **mesh) -> dict:
  mesh = dict(hbm_gib=hbm_gib, **mesh, **({'topology': topology} if topology else {}))
  return {**_ACCELERATOR, 'mesh': mesh}


_H100_GIB = 79.6
_V5P_GIB = 95.74
_V6E_GIB = 31.25
_V5E_GIB = 15.75      # v5e: 16 GiB HBM per chip, 15.75 GiB usable (libtpu's limit)

HARDWARE = {
    # One host, whatever devices it has (8 fake CPU devices in tests); no rematerialisation.
    # XLA:CPU's own fusion and threading (no mesh.xla_options): handing its elementwise fusions to
    # YNNPACK too made the `bench` forward + backward 0-9% faster but the demo's whole step 3-9%
    # slower, its AdamW update 44-88% slower (docs/performance.md, "Compiler options per
    # platform" and the AVX2 sessions). glibc gives XLA's buffers transparent huge pages
    # (radfm_jax/hostmem.py): 512x fewer page faults per step, the `bench` step 1-12% faster, the
    # demo's 9-27% (docs/performance.md, "The host allocator").
    # The dense projections' kernel gradients from their inputs written out transposed
    # (`model.dense_backward`, layers.transposed_backward_product): the `bench` forward + backward
    # 10-23% faster on an AVX2 EPYC, the demo's whole step 10% (docs/performance.md).
    'cpu': {'model': {'remat_policy': 'none', 'dense_backward': 'transposed'},
            'mesh': {'host_allocator': 'hugepages'}},
    'gpu_h100x8': _accelerator(_H100_GIB),
    # Several 8-GPU nodes: FSDP inside the node (NVLink), data parallel across nodes.
    'gpu_h100_multinode': _accelerator(
        _H100_GIB, ici=[['data', 1], ['fsdp', 8], ['tensor', 1]],
        dcn=[['data', -1], ['fsdp', 1], ['tensor', 1]]),
    'tpu_v5p_8': _accelerator(_V5P_GIB, 'v5p:2x2x1'),
    'tpu_v5p_16': _accelerator(_V5P_GIB, 'v5p:2x2x2'),
    'tpu_v5p_64': _accelerator(_V5P_GIB, 'v5p:4x4x2'),
    'tpu_v5p_128': _accelerator(_V5P_GIB, 'v5p:4x4x4'),
    # Single chips (LoRA / QLoRA fine-tuning, `radfm-jax aot`): one device, the fsdp axis of 1.
    'tpu_v5e_1': _accelerator(_V5E_GIB, 'v5e:1x1'),
    'tpu_v5e_8': _accelerator(_V5E_GIB, 'v5e:2x4'),
    'tpu_v6e_1': _accelerator(_V6E_GIB, 'v6e:1x1'),
    'tpu_v6e_8': _accelerator(_V6E_GIB, 'v6e:2x4'),
    'tpu_v6e_16': _accelerator(_V6E_GIB, 'v6e:4x4'),
    'tpu_v6e_64': _accelerator(_V6E_GIB, 'v6e:8x8'),
    'tpu_v6e_256': _accelerator(_V6E_GIB, 'v6e:16x16'),
}

# Fine-tuning methods (models/lora.py): adapters on the decoder's attention and MLP projections,
# everything else frozen; `qlora` keeps those frozen kernels in int8 (finetune.quant=int4 halves
# them again).
FINETUNE = {
    'full': {},
    'lora': {'finetune': {'method': 'lora'}, 'train': {'learning_rate': 2e-4}},
    'qlora': {'finetune': {'method': 'qlora', 'quant': 'int8'}, 'train': {'learning_rate': 2e-4}},
}

SECTIONS = ('model', 'mesh', 'data', 'generate', 'train', 'finetune')


def merge(base: dict, diff: dict) -> dict:
  """`diff` laid over `base`, recursively (nested dicts merge, anything else replaces)."""
  out = copy.deepcopy(base)
  for key, value in diff.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = merge(out[key], value)
    else:
      out[key] = copy.deepcopy(value)
  return out


def select(model: str = 'tiny', mesh: str = 'cpu', finetune: str = 'full') -> dict:
  """The fields one model size on one hardware preset (with one fine-tuning method) changes,
  with every section present (empty when nothing differs, so an experiment file can set
  `cfg.model.vision.x` on any size) and the picks recorded in `model.size` and `mesh.preset`."""
  if model not in MODEL_SIZES:
    raise ValueError(f'config arg model={model!r}: expected one of {sorted(MODEL_SIZES)}')
  if mesh not in HARDWARE:
    raise ValueError(f'config arg mesh={mesh!r}: expected one of {sorted(HARDWARE)}')
  if finetune not in FINETUNE:
    raise ValueError(f'config arg finetune={finetune!r}: expected one of {sorted(FINETUNE)}')
  skeleton = {s: {} for s in SECTIONS}
  skeleton['model'] = {'vision': {}, 'perceiver': {}, 'llama': {}, 'size': model}
  skeleton['mesh'] = {'preset': mesh}
  return merge(merge(merge(skeleton, MODEL_SIZES[model]), HARDWARE[mesh]), FINETUNE[finetune])
