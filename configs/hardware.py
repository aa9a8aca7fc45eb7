"""Mesh / hardware presets, merged into the `mesh` section (and a few compute fields).

`ici` and `dcn` are lists of (axis, size) over the axes `data`, `fsdp`, `tensor`; one `-1` in each
list fills what the device count leaves. `dcn` is the across-slice / across-node part (multi-slice
TPU, multi-node GPU); the mesh is a hybrid mesh whenever a `dcn` size is above 1. `topology` names a
TPU topology for ahead-of-time compiles from a CPU host (`radfm-jax aot`); `hbm_gib` is the usable
memory per chip that the fit check compares against.
"""

import ml_collections

_FSDP_ALL = [('data', 1), ('fsdp', -1), ('tensor', 1)]
_NO_DCN = [('data', 1), ('fsdp', 1), ('tensor', 1)]


def _preset(ici, dcn=None, rules='fsdp', compute_dtype='float32', remat_policy='nothing_saveable',
            topology='', hbm_gib=0.0, platform='cpu'):
  return dict(ici=ici, dcn=dcn or _NO_DCN, rules=rules, compute_dtype=compute_dtype,
              remat_policy=remat_policy, topology=topology, hbm_gib=hbm_gib, platform=platform)


PRESETS = {
    # One host, whatever devices it has (8 fake CPU devices in tests).
    'cpu': _preset(_FSDP_ALL, remat_policy='none'),
    'gpu_h100x8': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='gpu', hbm_gib=79.6),
    # Several 8-GPU nodes: FSDP inside the node (NVLink), data parallel across nodes.
    'gpu_h100_multinode': _preset([('data', 1), ('fsdp', 8), ('tensor', 1)],
                                  dcn=[('data', -1), ('fsdp', 1), ('tensor', 1)],
                                  compute_dtype='bfloat16', platform='gpu', hbm_gib=79.6),
    'tpu_v5p_8': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='tpu',
                         topology='v5p:2x2x1', hbm_gib=95.74),
    'tpu_v5p_16': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='tpu',
                          topology='v5p:2x2x2', hbm_gib=95.74),
    'tpu_v5p_64': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='tpu',
                          topology='v5p:4x4x2', hbm_gib=95.74),
    'tpu_v5p_128': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='tpu',
                           topology='v5p:4x4x4', hbm_gib=95.74),
    'tpu_v6e_8': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='tpu',
                         topology='v6e:2x4', hbm_gib=31.25),
    'tpu_v6e_16': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='tpu',
                          topology='v6e:4x4', hbm_gib=31.25),
    'tpu_v6e_64': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='tpu',
                          topology='v6e:8x8', hbm_gib=31.25),
    'tpu_v6e_256': _preset(_FSDP_ALL, compute_dtype='bfloat16', platform='tpu',
                           topology='v6e:16x16', hbm_gib=31.25),
}


def get_config(arg='cpu'):
  return ml_collections.ConfigDict(PRESETS[arg])
