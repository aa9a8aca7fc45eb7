"""The main experiment config: `configs/radfm.py:model=tiny,mesh=cpu`.

`arg` is a comma list of `key=value` picking a model size (`configs/model_sizes.py`) and a
hardware preset (`configs/hardware.py`); any field can then be overridden with dotted flags
(`--config.model.llama.num_layers=4`, or `overrides=[...]` in `radfm_jax.config.load_config`).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import hardware  # noqa: E402
import model_sizes  # noqa: E402


def _parse_arg(arg):
  picks = {'model': 'tiny', 'mesh': 'cpu'}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in picks:
      raise ValueError(f'config arg {item!r}: expected model=<size> or mesh=<preset>')
    picks[key] = value
  if picks['model'] not in model_sizes.SIZES:
    raise ValueError(f"config arg model={picks['model']!r}: expected one of {sorted(model_sizes.SIZES)}")
  if picks['mesh'] not in hardware.PRESETS:
    raise ValueError(f"config arg mesh={picks['mesh']!r}: expected one of {sorted(hardware.PRESETS)}")
  return picks


def get_config(arg=''):
  picks = _parse_arg(arg)
  hw = hardware.PRESETS[picks['mesh']]
  cfg = ml_collections.ConfigDict()
  cfg.name = f"radfm_{picks['model']}_{picks['mesh']}"
  cfg.seed = 0

  cfg.model = ml_collections.ConfigDict(model_sizes.SIZES[picks['model']])
  cfg.model.size = picks['model']
  cfg.model.vision.channels = 3
  cfg.model.vision.dropout = 0.1
  cfg.model.llama.rms_norm_eps = 1e-6
  cfg.model.llama.rope_theta = 10000.0
  cfg.model.max_images = 100          # tokenizer's M: <image0> .. <image{32M-1}>
  cfg.model.param_dtype = 'float32'
  cfg.model.compute_dtype = hw['compute_dtype']
  cfg.model.remat_policy = hw['remat_policy']
  cfg.model.scan_layers = True
  cfg.model.attention = 'xla'         # 'xla' | 'cudnn' (jax.nn.dot_product_attention) | 'splash' (TPU Pallas, decoder)

  cfg.mesh = ml_collections.ConfigDict()
  cfg.mesh.preset = picks['mesh']
  cfg.mesh.ici = [list(a) for a in hw['ici']]
  cfg.mesh.dcn = [list(a) for a in hw['dcn']]
  cfg.mesh.rules = hw['rules']
  cfg.mesh.platform = hw['platform']
  cfg.mesh.topology = hw['topology']
  cfg.mesh.hbm_gib = hw['hbm_gib']

  cfg.data = ml_collections.ConfigDict()
  cfg.data.store = ''
  cfg.data.manifest = ''
  cfg.data.tokenizer = ''
  cfg.data.intensity = 'radfm'        # 'radfm' | 'ct_window' | 'ct_windows3' | 'percentile'
  cfg.data.resize = 'nearest'         # 'nearest' (torch legacy, exact parity) | 'trilinear'
  cfg.data.image_size_2d = cfg.model.vision.image_size
  cfg.data.image_size_3d_single = cfg.model.vision.image_size // 2
  cfg.data.depth_buckets = list(range(4, min(64, cfg.model.vision.frames) + 1, 4))
  cfg.data.batch_size_2d = 4
  cfg.data.batch_size_3d = 1
  cfg.data.text_lengths = [n for n in (256, 512, 1024, 2048)
                          if n <= cfg.model.llama.max_position_embeddings]
  cfg.data.max_images = 8
  cfg.data.shuffle = True
  cfg.data.num_workers = 0
  cfg.data.drop_unreadable = True
  cfg.data.ct_windows = [[40.0, 400.0], [-600.0, 1500.0], [400.0, 1800.0]]  # (level, width) HU
  cfg.data.percentiles = [0.5, 99.5]  # for intensity='percentile'

  cfg.generate = ml_collections.ConfigDict()
  cfg.generate.max_new_tokens = 200
  cfg.generate.stop_ids = [2, 1]      # the original stops on 1 only: set [1] for exact parity
  cfg.generate.temperature = 0.0      # 0 = greedy
  cfg.generate.top_k = 0
  cfg.generate.top_p = 1.0
  cfg.generate.layer_loop = 'auto'    # 'scan' | 'unrolled' (per-layer weight copies; CPU default)
  cfg.generate.cache_chunk = 64       # KV cache grows by this many slots (0 = full length at once)

  cfg.train = ml_collections.ConfigDict()
  cfg.train.steps = 1000
  cfg.train.learning_rate = 1e-4
  cfg.train.warmup_steps = 100
  cfg.train.min_lr_ratio = 0.1        # cosine floor, as a fraction of learning_rate
  cfg.train.b1 = 0.9
  cfg.train.b2 = 0.999
  cfg.train.eps = 1e-8
  cfg.train.weight_decay = 0.0        # HF adamw_torch default; decays matmul kernels only
  cfg.train.max_grad_norm = 1.0       # 0 = no clipping
  cfg.train.grad_accum = 1            # microbatches per optimizer step
  cfg.train.loss = 'mean'             # 'mean' = the original's returned loss | 'weighted'
  cfg.train.freeze = ''               # comma list: vision, perceiver, fc, figure_tokens, llama, vision_tower, decoder
  cfg.train.log_every = 10
  cfg.train.eval_every = 0
  cfg.train.eval_steps = 2
  cfg.train.checkpoint_every = 500
  cfg.train.keep_checkpoints = 2
  cfg.train.async_checkpoint = True
  cfg.train.peak_tflops = 0.0         # per device; 0 = from the device kind (MFU)
  cfg.train.tensorboard = True
  cfg.train.synthetic_images = 1      # synthetic batches (data.store == '')
  cfg.train.synthetic_length = 0      # 0 = data.text_lengths[0]
  return cfg
