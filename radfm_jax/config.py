"""The config schema (frozen dataclasses: the ONLY defaults), loading, validation, mesh shapes.

    cfg = load_config('configs/radfm.py:model=tiny,mesh=cpu', ['model.llama.num_layers=4'])
    cfg = load_config('radfm:model=tiny')     # the built-in experiment, from any directory

An experiment file's `get_config(arg)` lists only what differs from the dataclass defaults; loading
lays it over the full default ConfigDict (`defaults()`), then applies `a.b.c=value` overrides, so an
override of a field the file does not list still works and an unknown field is still an error.
`load_config` returns a validated `Config`; every error names the dotted field and the value it
expected, so a bad flag fails on the host in milliseconds rather than deep inside a compile.
Nothing here imports JAX (the mesh-shape arithmetic is plain Python; `sharding.py` builds meshes).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import numbers
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections

from radfm_jax import hostmem, presets
from radfm_jax.errors import UserError

REMAT_POLICIES = ('none', 'full', 'nothing_saveable', 'dots_saveable',
                  'dots_with_no_batch_dims_saveable', 'everything_saveable')
DTYPES = ('float32', 'bfloat16', 'float16')
DENSE_BACKWARDS = ('autodiff', 'transposed')
CPU_PRODUCTS = ('auto', 'panels', 'xla')   # generate.cpu_product
IMAGE_SHAPES = ('original', 'train')        # generate.image_shape
MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')     # the mesh axes the batch dimension is sharded over (act_batch)
RULE_PRESETS = ('fsdp', 'fsdp_tp')
# The built-in experiments ship inside the package (radfm_jax/experiments/*.py), so a wheel
# install resolves `radfm` / `configs/radfm.py` without a source tree; configs/ at the top of the
# repository links to them (symlinks: one source) for users to read, copy and edit. A path that exists always wins over the built-in of the same name.
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'experiments')


class ConfigError(UserError, ValueError):
  """A config field holds a value the model, mesh or pipeline cannot use."""


def _fail(field: str, value: Any, expected: str):
  # A NumPy scalar may hold a fitting value: say it is the type that is refused (a config is
  # saved as JSON, which takes Python numbers only).
  kind = type(value)
  got = (f' (got {kind.__module__}.{kind.__name__}; expected a Python number: .item())'
         if kind.__module__ == 'numpy' else '')
  raise ConfigError(f'config field {field}={value!r}: expected {expected}{got}')


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """3D ViT. `image_size` x `image_size` x `frames` is the largest input (sets the position tables)."""
  image_size: int = 512
  frames: int = 512
  patch_size: int = 32
  frame_patch_size: int = 4
  channels: int = 3
  dim: int = 768
  depth: int = 12
  heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 2048
  dropout: float = 0.1
  # eps of the LayerNorm over each raw patch (the first op on the pixels). 1e-5 is the original's
  # (torch default): it normalises every patch to unit variance, so a flat patch's noise (variance
  # ~1e-5..1e-3 in [0, 1] images) becomes a full-size random pattern. A larger eps (1e-2) leaves
  # such patches near zero while patches with real contrast are still normalised
  # (radfm_jax/eval/vision.py measures the effect).
  patch_norm_eps: float = 1e-5
  # Initialisation only (not the forward): the (row, col, depth) position tables start
  # uniform(0, pos_init_scale). 1.0 is the original's uniform(0, 1). The tables are added to
  # LayerNormed patch features (unit variance per feature), so at 1.0 a patch's position is a
  # small part of its token; a from-scratch model then needs hundreds of steps before it can tell
  # where a finding is (left from right), while it learns whether there is one at once. A larger
  # scale (3) makes position readable from step 0 (docs/performance.md,
  # benchmarks/vision_learnability.py --task side).
  pos_init_scale: float = 1.0

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.frame_patch_size * self.channels

  @property
  def pos_rows(self) -> tuple[int, int, int]:
    """Rows of the learned (row, col, depth) position tables."""
    return (self.image_size // self.patch_size, self.image_size // self.patch_size,
            self.frames // self.frame_patch_size)


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
  depth: int = 6
  heads: int = 8
  head_dim: int = 64
  num_latents: int = 32
  ff_mult: int = 4
  # Initialisation only (not the forward): std of the learned latents. 1.0 is the original's
  # randn; a small value (0.02, as the DeepMind Perceiver) makes the image-dependent attention
  # output, not the scan-independent latent itself, dominate the resampler's output from step 0
  # (the from-scratch demo's vision path collapses otherwise: radfm_jax/eval/vision.py).
  latent_init_std: float = 1.0


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 5120
  intermediate_size: int = 13824
  num_layers: int = 40
  num_heads: int = 40
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: VisionConfig = VisionConfig()
  perceiver: PerceiverConfig = PerceiverConfig()
  llama: LlamaConfig = LlamaConfig()
  size: str = 'radfm_13b'
  max_images: int = 100
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = True
  attention: str = 'xla'
  # How the backward pass of every dense projection (layers.Dense) runs: 'autodiff' (JAX's own
  # transpose rule: accelerators), or 'transposed': the kernel gradient's product reads the input
  # written out transposed first, so XLA:CPU runs it as a plain row-major YNNPACK dot
  # (layers.transposed_backward_product; the `cpu` preset: the same values to float rounding,
  # docs/performance.md). LoRA / QLoRA models keep 'autodiff': Qwix adds their adapters inside the
  # product.
  dense_backward: str = 'autodiff'

  @property
  def num_figure_tokens(self) -> int:
    return 2  # <image>, </image>

  @property
  def image_token_offset(self) -> int:
    """Id of `<image0>`: the first image-latent placeholder (32002 at the official vocab)."""
    return self.llama.vocab_size + self.num_figure_tokens


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  ici: tuple[tuple[str, int], ...] = (('data', 1), ('fsdp', -1), ('tensor', 1))
  dcn: tuple[tuple[str, int], ...] = (('data', 1), ('fsdp', 1), ('tensor', 1))
  rules: str = 'fsdp'
  preset: str = 'cpu'         # the hardware preset's name (radfm_jax/presets.py), for messages
  topology: str = ''
  hbm_gib: float = 0.0
  # XLA compiler options of this hardware's train and eval steps, as (name, value) pairs passed to
  # `jax.jit(compiler_options=...)`: the platform's fusion and threading choices (presets.py), e.g.
  # [["xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"]]. XLA checks
  # the names and values when the step compiles (train/step.py names a bad one).
  xla_options: tuple[tuple[str, Any], ...] = ()
  # How glibc's malloc serves the host's buffers ('system', 'hugepages' or 'keep':
  # radfm_jax/hostmem.py); `radfm-jax train` / `demo` restart with its settings before JAX starts.
  host_allocator: str = 'system'


# `data.store=synthetic`: train on deterministic random batches built from the config shapes
# (radfm_jax/train/synthetic.py; tests, benchmarks, throughput runs) instead of a VolumeStore.
SYNTHETIC_STORE = 'synthetic'


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # The VolumeStore folder written by `radfm-jax ingest` (a folder literally named `synthetic` is
  # written `./synthetic`), or 'synthetic' for random batches; training needs one of the two.
  store: str = ''
  manifest: str = ''
  tokenizer: str = ''
  intensity: str = 'radfm'
  resize: str = 'nearest'
  # 2D images (depth 1) as the original loads them (docs/original.md section 11.1): 'bicubic' cuts
  # a crop box and resizes it to image_size_2d x image_size_2d with Pillow's bicubic filter (as
  # torchvision's RandomResizedCrop does on a PIL image), before the sample's `resize` to its
  # bucket; 'nearest': no such step, a 2D image is resized like any scan (by `resize`).
  resize_2d: str = 'bicubic'
  # The box of that step while training (the train split only): the original's RandomResizedCrop
  # (area 0.8-1.0 of the image, aspect 3/4-4/3, drawn per sample and epoch from the run's seed).
  # False, and always at inference and on held-out splits: the whole image (the original crops
  # at random there too, so its answers vary from call to call: docs/original.md section 13).
  random_crop_2d: bool = True
  image_size_2d: int = 512
  image_size_3d_single: int = 256
  depth_buckets: tuple[int, ...] = tuple(range(4, 65, 4))
  batch_size_2d: int = 4
  batch_size_3d: int = 1
  text_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
  max_images: int = 8
  shuffle: bool = True
  num_workers: int = 0
  drop_unreadable: bool = True
  # With drop_unreadable, training stops (after saving a checkpoint) once more than this share of
  # the samples a call has drawn were unreadable, counted from the 10th: a store moved or damaged
  # wholesale must not train on empty rows. 1.0: never stop.
  max_unreadable_share: float = 0.1
  ct_windows: tuple[tuple[float, float], ...] = ((40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0))
  # data.intensity='percentile': (low, high) percentiles per image; equal ones -> its min-max
  percentiles: tuple[float, float] = (0.5, 99.5)
  # Read each scan's cached image tokens (`radfm-jax cache-images`, data/image_cache.py) instead of
  # its volume and skip the vision tower; needs the tower frozen and a deterministic image path.
  image_cache: bool = False
  # The training mixture: (dataset, weight) pairs over the manifest's `dataset` field (a record
  # without one is dataset 'default'); each epoch of the train split draws len(split) samples,
  # dataset d's share w_d / sum(w) (data/pipeline.py: BatchPlan). Empty = proportional to size,
  # every sample once per epoch (the original's concatenated datasets). Overrides take a mapping:
  # --config.data.mixture="{'vqa_rad': 2, 'slake': 1}". A weight of 0 leaves a dataset out.
  mixture: tuple[tuple[str, float], ...] = ()
  # What a 3D batch's `images` hold on the host. 'float32': the model input itself (3 channels,
  # [0, 1]). 'stored': the resized voxels in the stored dtype (int16 CT: 1/6 of the bytes) plus
  # each image's intensity map; the device applies the map and repeats to 3 channels
  # (data/batch.py: device_inputs), bit-identical to 'float32' (tests/test_data_host_dtype.py).
  host_dtype: str = 'stored'
  # Read a 3D scan's training-resolution copy (`radfm-jax ingest --train-resolution N`,
  # data/train_copies.py) instead of the full scan when its batch is N x N in-plane: the same
  # model inputs bit for bit from fewer voxels. Copies that do not apply are never read (a line
  # says why: another size, stale, data.resize='trilinear', data.intensity='percentile').
  train_copies: bool = True


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  max_new_tokens: int = 200
  stop_ids: tuple[int, ...] = (2, 1)
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  # How decoding runs the decoder layers: 'scan' over the stacked weights, 'unrolled' over
  # per-layer copies made once per call (faster on XLA:CPU, where a scan copies every layer's
  # weights at every step; costs one extra copy of the decoder weights), 'auto' = unrolled on CPU.
  layer_loop: str = 'auto'
  # The KV cache grows in chunks of this many slots as decoding proceeds, so a step reads only the
  # chunks written so far instead of all prompt + max_new_tokens slots (one compiled loop body per
  # chunk); 0 = one cache of the full length from the start.
  cache_chunk: int = 64
  # How the unrolled (CPU) decode multiplies by the decoder weights: 'panels' = radfm_jax's C++
  # kernel on weights packed once (radfm_jax/infer/panel_kernel.py; built with the host's C++
  # compiler on first use; float32), 'xla' = XLA:CPU's products, which re-pack every weight at
  # every product; 'auto' = panels when the model computes in float32 on one CPU device and the
  # kernel builds, else xla (saying why once). Values differ from xla's in the last bits only.
  cpu_product: str = 'auto'
  # The (H, W, D) bucket of a prompt's images (transforms.generation_shape). 'original': as the
  # original's test script and demo, which stack each sample without the training collator:
  # data.image_size_2d in-plane and the full data.depth_buckets (512 x 512 x D <= 64 for a 3D
  # scan), whatever the batch. 'train': the bucket training gives the sample's kind
  # (batch.image_shape: a 3D scan at data.image_size_3d_single, 256, with data.batch_size_3d=1),
  # the resolution the model was trained at (the original's train/test mismatch,
  # docs/original.md section 13 item 5).
  image_shape: str = 'original'


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, loss, freezing, logging and checkpoint cadence (radfm_jax/train)."""
  steps: int = 1000                    # total optimizer steps (the schedule's length)
  learning_rate: float = 1e-4          # peak, reached after the warmup
  # Linear warmup from 0 over this many steps; -1 = min(100, steps // 10): 100 for the radfm
  # experiment's 1000 steps and any run of 1000+ steps, a tenth of a shorter run (`warmup`).
  # An explicit value is used as given and must be < steps.
  warmup_steps: int = -1
  min_lr_ratio: float = 0.1            # cosine decays to learning_rate * min_lr_ratio at `steps`
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0            # AdamW, on matmul kernels only (radfm_jax/train/optim.py)
  max_grad_norm: float = 1.0           # global-norm clipping; 0 = off
  grad_accum: int = 1                  # microbatches per step (scan; exact big-batch gradient)
  loss: str = 'mean'                   # 'mean' (the original's returned loss) | 'weighted'
  freeze: tuple[str, ...] = ()         # top-level modules kept fixed, or 'vision_tower' / 'decoder'
  log_every: int = 10
  eval_every: int = 0                  # 0 = no periodic eval
  eval_steps: int = 2
  checkpoint_every: int = 500          # 0 = only at the end / on SIGTERM
  keep_checkpoints: int = 2
  async_checkpoint: bool = True
  peak_tflops: float = 0.0             # per device, for MFU; 0 = look up the device kind
  tensorboard: bool = True
  synthetic_images: int = 1            # data.store='synthetic': images per sample
  synthetic_length: int = 0            # synthetic text length; 0 = data.text_lengths[0]
  # (regex, multiplier) pairs: a trainable parameter whose path ('vision/blocks/q/kernel') fully
  # matches the first pattern trains at learning_rate * multiplier (train/optim.py)
  lr_multipliers: tuple[tuple[str, float], ...] = ()
  # (regex, steps) pairs: a trainable parameter whose path fully matches the first pattern is not
  # updated for the first `steps` steps, then warms up over `warmup` steps to the run's schedule
  # (a warm-up phase of the other towers, e.g. [["llama/layers/.*", 200]]; train/optim.py)
  lr_delays: tuple[tuple[str, int], ...] = ()

  @property
  def warmup(self) -> int:
    """The warmup steps the schedule uses (`warmup_steps`, or its automatic value for -1)."""
    return self.warmup_steps if self.warmup_steps >= 0 else min(100, self.steps // 10)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """How a run adapts the model (models/lora.py): `full` trains every parameter not in
  train.freeze; `lora` trains Qwix LoRA adapters on the matmuls whose module path fully matches a
  `targets` regex (base frozen); `qlora` also keeps those base kernels quantized (`quant`)."""
  method: str = 'full'                 # 'full' | 'lora' | 'qlora'
  rank: int = 8
  alpha: float = 16.0                  # the adapters' output is scaled by alpha / rank
  dropout: float = 0.0                 # on the adapters' input
  targets: tuple[str, ...] = (r'llama/layers/(q|k|v|o|gate|up|down)',)
  train_full: tuple[str, ...] = ()     # towers (train.freeze names) trained in full beside them
  quant: str = 'int8'                  # qlora base kernels: 'int8' | 'int4'
  init_from: str = ''                  # checkpoint whose weights start the run ('' = random)


FREEZE_GROUPS = {'vision': ('vision',), 'perceiver': ('perceiver',), 'fc': ('fc',),
                 'figure_tokens': ('figure_tokens',), 'llama': ('llama',),
                 'vision_tower': ('vision', 'perceiver', 'fc'), 'decoder': ('llama',)}


# Fields that make the image path random while training: cached image tokens (data.image_cache)
# are exact only when each holds this value (a random augmentation field belongs here too).
IMAGE_CACHE_DETERMINISTIC = {'model.vision.dropout': 0.0, 'data.random_crop_2d': False}


@dataclasses.dataclass(frozen=True)
class Config:
  """The validated config. Sections without a dataclass (an experiment's own, e.g. `demo`) stay in
  `extra` (a locked ConfigDict)."""
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  generate: GenerateConfig = GenerateConfig()
  train: TrainConfig = TrainConfig()
  finetune: FinetuneConfig = FinetuneConfig()
  seed: int = 0            # parameter init, dropout and data-order keys
  extra: Any = None
  source: ml_collections.ConfigDict | None = dataclasses.field(default=None, compare=False)

  def to_dict(self) -> dict:
    """The full resolved config (every field, defaults included) as plain JSON-able data (saved
    beside checkpoints)."""
    return self.source.to_dict() if self.source is not None else dataclasses.asdict(self)


# Seeds are JAX PRNG keys of 32 bits: a larger one would wrap (2^32 is seed 0) or overflow.
SEED_LIMIT = 2**32


def is_seed(value) -> bool:
  """Whether `value` is a seed: an integer (not a bool) in [0, SEED_LIMIT). The one check of the
  config's `seed`, every --seed flag and `generate`'s seed argument."""
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and 0 <= value < SEED_LIMIT)

_SCHEMA_FIELDS = ('model', 'mesh', 'data', 'generate', 'train', 'finetune', 'seed')


# ------------------------------------------------------------------------------------------------
# Loading


def _plain(value):
  """Tuples as lists, at every depth (the ConfigDict form of a dataclass value)."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def defaults() -> ml_collections.ConfigDict:
  """The full config holding every dataclass default: the schema that experiment files and
  overrides are laid over."""
  full = dataclasses.asdict(Config())
  return ml_collections.ConfigDict({name: _plain(full[name]) for name in _SCHEMA_FIELDS})


def _is_section(value) -> bool:
  return isinstance(value, (dict, ml_collections.ConfigDict))


def _coerce(field: str, old, value, text: str | None = None):
  """`value` in the type of the field's current value `old` (an int for a float field becomes a
  float, a comma string or a scalar for a list field a list, an override's text for a string)."""
  if isinstance(old, str) and not isinstance(value, str):
    if text is None:
      _fail(field, value, 'a string')
    return text
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(old, list):
    if _is_section(value):             # a mapping for a pair-list field: its (key, value) pairs
      return [[k, _plain(v)] for k, v in value.items()]
    if isinstance(value, str):
      return [_parse_value(v.strip()) for v in _split_items(value) if v.strip()]
    return _plain(value) if isinstance(value, (list, tuple)) else [value]
  if type(old) is not type(value):
    _fail(field, value, f'a value of type {type(old).__name__} (the default is {old!r})')
  return value


def _split_items(text: str) -> list[str]:
  """'vision,fc' -> ['vision', 'fc']: a list field's comma string cut at its commas outside
  brackets, so a regex keeps its own ('llama/(q|k){1,2}', '[,;]') instead of being cut into
  two patterns that still compile (a backslash escapes the bracket after it)."""
  items, depth, start, escaped = [], 0, 0, False
  for i, ch in enumerate(text):
    if escaped:
      escaped = False
    elif ch == '\\':
      escaped = True
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth = max(depth - 1, 0)
    elif ch == ',' and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return items + [text[start:]]


def _lay_over(base: ml_collections.ConfigDict, diff, prefix: str = ''):
  """Writes `diff` (a partial config) into the full `base`, field by field, checking names and
  coercing types. A top-level section outside the schema (an experiment's own, e.g. `demo`) is
  taken as it is."""
  for key, value in diff.items():
    if not isinstance(key, str):          # a dict key of an experiment file: {1: ...}, {None: ...}
      raise ConfigError(f'config {"section " + prefix[:-1] if prefix else "top level"}: key '
                        f'{key!r} of type {type(key).__name__}; expected field names (strings)')
    field = prefix + key
    if key not in base:
      if not prefix and key not in _SCHEMA_FIELDS and _is_section(value):
        # an experiment's own section, unless its name is a near-miss of one of ours (`trian`):
        # then the settings the user meant for that section would be silently unused
        near = difflib.get_close_matches(key, list(base.keys()), n=1, cutoff=0.75)
        if near:
          raise ConfigError(f'config section {key}: unknown (did you mean {near[0]}?); expected '
                            'one of ours, or a section of your own whose name is not a near-miss '
                            'of one')
        base[key] = ml_collections.ConfigDict(value)
        continue
      raise ConfigError(f'config field {field}: no such field (fields here: {sorted(base.keys())}'
                        f"{'; a section of your own must be a dict' if not prefix else ''})")
    old = base[key]
    if isinstance(old, ml_collections.ConfigDict):
      if not _is_section(value):
        _fail(field, value, 'a section (dict) of fields')
      _lay_over(old, value, field + '.')
    else:
      base[key] = _coerce(field, old, value)
  return base


def with_defaults(diff) -> ml_collections.ConfigDict:
  """The full config: `diff` (a ConfigDict or dict listing only some fields) over `defaults()`."""
  if not _is_section(diff):
    raise ConfigError(f'config: expected a ConfigDict or dict of sections, '
                      f'got {type(diff).__name__}')
  return _lay_over(defaults(), diff)


def builtin_experiments() -> list[str]:
  """Names of the experiments shipped in the package (`radfm`, `demo`)."""
  return sorted(f[:-3] for f in os.listdir(EXPERIMENTS_DIR)
                if f.endswith('.py') and not f.startswith('_'))


def resolve_config_path(path: str) -> str:
  """An existing file as given, else the built-in experiment of that name for `NAME`, `NAME.py`
  or `configs/NAME.py` (only those: a typo in any other path must not load a built-in)."""
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    raise ConfigError(f'config file {path!r}: a folder; expected a path to a get_config(arg) '
                      f'file, or a built-in experiment: {", ".join(builtin_experiments())}')
  head, name = os.path.split(path)
  builtin = os.path.join(EXPERIMENTS_DIR, name.removesuffix('.py') + '.py')
  if head in ('', 'configs') and name and os.path.isfile(builtin):
    return builtin
  raise ConfigError(f'config file {path!r} does not exist (expected a path to a get_config(arg) '
                    f'file, or a built-in experiment: {", ".join(builtin_experiments())})')


def import_config_file(path: str):
  """The module of an experiment file (its own module name per path: files never share state)."""
  spec = importlib.util.spec_from_file_location(f'radfm_config_{abs(hash(path))}', path)
  if spec is None:                      # not a .py file: Python has no loader for it
    raise ConfigError(f'config file {path}: not a Python file; expected a .py file defining '
                      'get_config(arg)')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'config file {path} line {e.lineno}: SyntaxError: {e.msg}') from e
  except (Exception, SystemExit) as e:  # noqa: BLE001  (the user's code: whatever it raises,
    raise ConfigError(_raised_in(path, e)) from e    # a sys.exit too, is told as one line)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} defines no get_config(arg)')
  return module


def _raised_in(path: str, error: BaseException) -> str:
  """'config file PATH line N: TypeError: ...' for an exception raised while running an
  experiment file (N: the file's last line in the traceback)."""
  line = None
  tb = error.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = tb.tb_lineno
    tb = tb.tb_next
  at = f' line {line}' if line is not None else ''
  return f'config file {path}{at}: {type(error).__name__}: {error}'


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def override_key(item: str) -> str:
  """The dotted field an override names: `--config.a.b=1`, `config.a.b=1`, `a.b=1` -> 'a.b'."""
  return item.partition('=')[0].strip().lstrip('-').removeprefix('config.')


def check_override_sections(overrides: Sequence[str], sections: Sequence[str], why: str):
  """ConfigError naming the first override outside `sections`, for a command that reads only
  those (the value would be accepted and do nothing); `why` ends the message."""
  for item in overrides:
    if not any(override_key(item).startswith(section + '.') for section in sections):
      raise ConfigError(f'override {item!r}: only {" / ".join(s + ".*" for s in sections)} '
                        f'fields apply here ({why})')


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]):
  """Applies `a.b.c=value` overrides to a full config (value parsed as a Python literal, else a
  string, then coerced to the field's type)."""
  for item in overrides:
    _, sep, text = item.partition('=')
    if not sep:
      raise ConfigError(f'override {item!r}: expected dotted.field=value')
    key = override_key(item)
    *parents, leaf = key.split('.')
    node = cfg
    for i, name in enumerate(parents):
      if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
        raise ConfigError(f"override {item!r}: no config section {'.'.join(parents[:i + 1])}")
      node = node[name]
    if leaf not in node:
      raise ConfigError(f'override {item!r}: no config field {key} '
                        f'(fields here: {sorted(node.keys())})')
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ConfigError(f'override {item!r}: {key} is a section; set one of its fields '
                        f'{sorted(node[leaf].keys())}')
    node[leaf] = _coerce(key, node[leaf], _parse_value(text), text)
  return cfg


def load_config_dict(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`path.py[:arg]` (or a built-in `NAME[:arg]`) -> the full ConfigDict: the file's fields over
  the defaults, overrides applied (not yet validated)."""
  spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
  if not isinstance(spec, str):
    raise ConfigError(f'config spec {spec!r}: expected a string "path.py[:arg]" or "NAME[:arg]"')
  overrides = () if overrides is None else overrides
  if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
    raise ConfigError(f'overrides {overrides!r}: expected a list of "dotted.field=value" strings')
  path, _, arg = spec.partition(':')
  resolved = resolve_config_path(path)
  module = import_config_file(resolved)
  try:
    diff = module.get_config(arg)
  except ConfigError:
    raise
  except ValueError as e:     # the file's own check of ARG (e.g. presets.select: model=<size>)
    raise ConfigError(f'--config {spec}: {e}') from e
  except (Exception, SystemExit) as e:  # noqa: BLE001  (a bug in the user's get_config, or its
    raise ConfigError(_raised_in(resolved, e)) from e   # sys.exit: one line, --verbose)
  return apply_overrides(with_defaults(diff), overrides)


def load_config(spec: str, overrides: Sequence[str] = (), num_devices: int | None = None) -> Config:
  return validate(load_config_dict(spec, overrides), num_devices=num_devices)


# ------------------------------------------------------------------------------------------------
# Validation


def _build(cls, section: ml_collections.ConfigDict | dict, prefix: str, **nested):
  section = dict(section.items()) if section is not None else {}
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(section) - names)
  if unknown:
    raise ConfigError(f'config section {prefix} has unknown fields {unknown}; '
                      f'expected a subset of {sorted(names)}')
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name in nested:
      kwargs[f.name] = nested[f.name]
    elif f.name in section:
      value = section[f.name]
      if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      kwargs[f.name] = value
  return cls(**kwargs)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _positive(prefix: str, obj, *names: str):
  for name in names:
    value = getattr(obj, name)
    if not _is_int(value) or value <= 0:
      _fail(f'{prefix}.{name}', value, 'a positive integer')


def _non_negative(prefix: str, obj, *names: str, note: str = ''):
  for name in names:
    value = getattr(obj, name)
    if not _is_int(value) or value < 0:
      _fail(f'{prefix}.{name}', value, 'an integer >= 0' + note)


def _real(x) -> bool:
  """A finite int or float (not a bool, NaN or inf)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _finite(field: str, value, expected: str, ok=lambda x: True):
  """A finite number for which `ok` holds."""
  if not _real(value) or not ok(value):
    _fail(field, value, expected)


def _bool(prefix: str, obj, *names: str):
  for name in names:
    if not isinstance(getattr(obj, name), bool):
      _fail(f'{prefix}.{name}', getattr(obj, name), 'True or False')


def _increasing_ints(field: str, values, expected: str, ok=lambda x: True):
  """A non-empty, strictly increasing list of integers for which `ok` holds."""
  if (not values or any(not _is_int(v) or not ok(v) for v in values)
      or any(a >= b for a, b in zip(values, values[1:]))):
    _fail(field, list(values), f'a non-empty increasing list of {expected}')


def validate_model(m: ModelConfig):
  """Raises ConfigError naming the first model field the model cannot use."""
  v, p, l = m.vision, m.perceiver, m.llama
  _positive('model.vision', v, 'image_size', 'frames', 'patch_size', 'frame_patch_size', 'channels',
            'dim', 'depth', 'heads', 'head_dim', 'mlp_dim')
  if v.image_size % v.patch_size:
    _fail('model.vision.image_size', v.image_size,
          f'a multiple of model.vision.patch_size={v.patch_size}')
  if v.frames % v.frame_patch_size:
    _fail('model.vision.frames', v.frames,
          f'a multiple of model.vision.frame_patch_size={v.frame_patch_size}')
  if v.dim % 3:
    _fail('model.vision.dim', v.dim, 'a multiple of 3 (the 3D position table splits it in row/col/depth)')
  _finite('model.vision.dropout', v.dropout, 'a probability in [0, 1)', lambda x: 0 <= x < 1)
  _finite('model.vision.patch_norm_eps', v.patch_norm_eps, 'a finite value > 0', lambda x: x > 0)
  _finite('model.vision.pos_init_scale', v.pos_init_scale, 'a finite value > 0', lambda x: x > 0)
  _positive('model.perceiver', p, 'depth', 'heads', 'head_dim', 'num_latents', 'ff_mult')
  _finite('model.perceiver.latent_init_std', p.latent_init_std, 'a finite value > 0',
          lambda x: x > 0)
  _positive('model.llama', l, 'vocab_size', 'hidden_size', 'intermediate_size', 'num_layers',
            'num_heads', 'max_position_embeddings')
  _finite('model.llama.rms_norm_eps', l.rms_norm_eps, 'a finite value > 0', lambda x: x > 0)
  _finite('model.llama.rope_theta', l.rope_theta, 'a finite value > 0', lambda x: x > 0)
  if l.hidden_size % l.num_heads:
    _fail('model.llama.num_heads', l.num_heads,
          f'a divisor of model.llama.hidden_size={l.hidden_size}')
  if l.head_dim % 2:
    _fail('model.llama.num_heads', l.num_heads,
          f'a head count giving an even head_dim for rotate-half RoPE (now {l.head_dim})')
  if m.param_dtype not in DTYPES:
    _fail('model.param_dtype', m.param_dtype, f'one of {DTYPES}')
  if m.compute_dtype not in DTYPES:
    _fail('model.compute_dtype', m.compute_dtype, f'one of {DTYPES}')
  if m.remat_policy not in REMAT_POLICIES:
    _fail('model.remat_policy', m.remat_policy, f'one of {REMAT_POLICIES}')
  if m.attention not in ('xla', 'cudnn', 'splash'):
    _fail('model.attention', m.attention, "'xla', 'cudnn' or 'splash' (TPU)")
  if m.dense_backward not in DENSE_BACKWARDS:
    _fail('model.dense_backward', m.dense_backward, f'one of {DENSE_BACKWARDS}')
  _positive('model', m, 'max_images')
  _bool('model', m, 'scan_layers')


def _validate_axes(field: str, axes):
  if not isinstance(axes, (list, tuple)) or not all(
      isinstance(a, (list, tuple)) and len(a) == 2 for a in axes):
    _fail(field, axes, f'(axis, size) pairs, one for each of {MESH_AXES}')
  names = [a for a, _ in axes]
  if sorted(names) != sorted(MESH_AXES):
    _fail(field, [list(a) for a in axes], f'one (axis, size) pair for each of {MESH_AXES}')
  sizes = [s for _, s in axes]
  if any((not isinstance(s, int)) or (s < 1 and s != -1) for s in sizes):
    _fail(field, [list(a) for a in axes], 'sizes that are positive integers or -1 (fill)')
  if sizes.count(-1) > 1:
    _fail(field, [list(a) for a in axes], 'at most one -1 (fill) size')


def _fill(axes: Sequence[tuple[str, int]], total: int, field: str) -> dict[str, int]:
  sizes = dict(axes)
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if total % known:
      raise ConfigError(f'config field {field}={[list(a) for a in axes]!r}: expected sizes whose '
                        f'product divides {total} devices (fixed part is {known})')
    sizes = {a: (total // known if s == -1 else s) for a, s in sizes.items()}
  if math.prod(sizes.values()) != total:
    raise ConfigError(f'config field {field}={[list(a) for a in axes]!r}: expected sizes whose '
                      f'product is {total}, got {math.prod(sizes.values())}')
  return sizes


def resolve_mesh_shape(ici, dcn, num_devices: int, num_slices: int | None = None):
  """(ici sizes, dcn sizes) in `MESH_AXES` order, with -1 filled, for `num_devices` devices.

  `num_slices` (number of slices / nodes) defaults to the product of the non-fill dcn sizes, or 1.
  """
  dcn_known = math.prod(s for _, s in dcn if s != -1)
  if num_slices is None:
    num_slices = dcn_known if -1 not in dict(dcn).values() else None
  if num_slices is None:
    raise ConfigError('config field mesh.dcn uses -1 but the number of slices is unknown')
  if num_devices % num_slices:
    raise ConfigError(f'config field mesh.dcn={[list(a) for a in dcn]!r}: expected a slice count '
                      f'dividing {num_devices} devices, got {num_slices}')
  dcn_sizes = _fill(dcn, num_slices, 'mesh.dcn')
  ici_sizes = _fill(ici, num_devices // num_slices, 'mesh.ici')
  return tuple(ici_sizes[a] for a in MESH_AXES), tuple(dcn_sizes[a] for a in MESH_AXES)


def check_data_store(cfg: Config) -> None:
  """Training needs a data source by name: a store folder or `data.store=synthetic`."""
  if not cfg.data.store:
    raise ConfigError(f'config field data.store is empty: expected the VolumeStore folder '
                      f'written by `radfm-jax ingest` (--config.data.store=STORE), or '
                      f'--config.data.store={SYNTHETIC_STORE} to train on random batches')
  if cfg.data.store == SYNTHETIC_STORE and cfg.data.mixture:
    # random batches have no datasets: the weights would be accepted and do nothing
    _fail('data.mixture', mixture_weights(cfg.data), f'none with data.store={SYNTHETIC_STORE} '
          '(random batches, no datasets to weigh); the weights apply to a VolumeStore')
  if cfg.data.store == SYNTHETIC_STORE:
    # random batches are token ids from no manifest: a path given here would do nothing
    for name, why in (('tokenizer', 'they are token ids already, nothing is tokenized'),
                      ('manifest', 'they are read from no manifest')):
      if getattr(cfg.data, name):
        _fail(f'data.{name}', getattr(cfg.data, name), f"'' with data.store={SYNTHETIC_STORE} "
              f'(random batches: {why})')
    _check_synthetic_length(cfg)
    return
  if os.path.isfile(cfg.data.store):   # else read as STORE/manifest.jsonl below a file
    raise ConfigError(f'config field data.store={cfg.data.store}: a file; expected the '
                      'VolumeStore folder written by `radfm-jax ingest`')
  defaults = TrainConfig()
  for name in ('synthetic_length', 'synthetic_images'):    # read by synthetic batches only
    if getattr(cfg.train, name) != getattr(defaults, name):
      _fail(f'train.{name}', getattr(cfg.train, name), f'the default ({getattr(defaults, name)}) '
            f'with data.store={cfg.data.store!r}: only data.store={SYNTHETIC_STORE} reads it')


def _check_synthetic_length(cfg: Config) -> None:
  """The synthetic text length (train.synthetic_length, 0: data.text_lengths[0]) holds BOS,
  train.synthetic_images image blocks and some text, within the model's positions (a shorter one
  was SyntheticBatches' ValueError with its traceback; a longer one ran past
  model.llama.max_position_embeddings, which data.text_lengths may not)."""
  t, m = cfg.train, cfg.model
  images, latents = t.synthetic_images, m.perceiver.num_latents
  low, high = 3 + images * latents + 4, m.llama.max_position_embeddings
  if low > high:
    _fail('train.synthetic_images', images, f'at most {(high - 7) // latents} with data.store='
          f'{SYNTHETIC_STORE}: BOS, the image blocks of {latents} tokens each and some text '
          f'within model.llama.max_position_embeddings={high}')
  length = t.synthetic_length or cfg.data.text_lengths[0]
  if not low <= length <= high:
    field, value = (('train.synthetic_length', t.synthetic_length) if t.synthetic_length else
                    ('data.text_lengths', list(cfg.data.text_lengths)))
    _fail(field, value, f'a synthetic text length in [{low}, {high}] with data.store='
          f'{SYNTHETIC_STORE}: BOS, train.synthetic_images={images} image(s) of '
          f'{latents} tokens and some text, within model.llama.max_position_embeddings={high}'
          + ('' if t.synthetic_length else ' (train.synthetic_length=0: data.text_lengths[0])'))


def check_batch_axes(cfg: Config, num_devices: int, num_processes: int = 1,
                     kinds: Sequence[str] = ('2d', '3d')):
  """Raises ConfigError naming `data.batch_size_<kind>` when the global batch of that kind (per
  process size x `num_processes`) does not split into `train.grad_accum` microbatches that divide
  evenly over the mesh's batch axes (`BATCH_AXES`, ici x dcn) for `num_devices` devices. Plain
  arithmetic: run it before the model is built (JAX would fail at the first step's compile)."""
  ici, dcn = resolve_mesh_shape(cfg.mesh.ici, cfg.mesh.dcn, num_devices)
  sizes = {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}
  ways = math.prod(sizes[a] for a in BATCH_AXES)
  need = ways * cfg.train.grad_accum
  step = need // math.gcd(need, num_processes)        # per-process batch sizes that work
  for kind in kinds:
    name = f'batch_size_{kind}'
    size = getattr(cfg.data, name)
    if size * num_processes % need:
      shape = ', '.join(f'{a}={sizes[a]}' for a in MESH_AXES)
      _fail(f'data.{name}', size,
            f'a multiple of {step}: the global batch ({size} x {num_processes} process(es)) '
            f'must split into train.grad_accum={cfg.train.grad_accum} microbatch(es) over the '
            f'mesh batch axes {" x ".join(BATCH_AXES)} = {ways} (mesh {shape} on {num_devices} '
            f'devices, preset {cfg.mesh.preset!r})')


def check_batch_processes(index_map: Mapping[Any, tuple], process_of: Mapping[Any, int],
                          mesh: MeshConfig, rows: int) -> None:
  """Raises ConfigError naming mesh.ici / mesh.dcn when two processes hold the same rows of the
  global batch. Each process's pipeline yields rows of its own (data/pipeline.py: process p, rows
  [p*B, (p+1)*B) of every global batch), joined by `jax.make_array_from_process_local_data`:
  where the mesh's batch axes do not split the batch across processes (processes differing only
  along `tensor`), their different rows would be taken for one replicated batch, silently.

  `index_map`: {device: index} of the batch sharding for a global batch of `rows` rows
  (`Sharding.devices_indices_map((rows,))`; the first slice of an index is its rows);
  `process_of`: {device: its process index}. Plain data, so a fabricated mapping tests it. A
  NamedSharding's row ranges are equal or disjoint, so equal ranges are what is compared."""
  holders: dict[tuple[int, int], set[int]] = {}
  for device, index in index_map.items():
    start, stop, _ = (index[0] if index else slice(None)).indices(rows)
    holders.setdefault((start, stop), set()).add(int(process_of[device]))
  for (start, stop), processes in sorted(holders.items()):
    if len(processes) > 1:
      first, second = sorted(processes)[:2]
      raise ConfigError(
          f'config fields mesh.ici={[list(a) for a in mesh.ici]!r} / '
          f'mesh.dcn={[list(a) for a in mesh.dcn]!r}: processes {first} and {second} both hold '
          f'rows [{start}, {stop}) of the global batch of {rows}, but each process reads rows of '
          'its own, which would be joined as one replicated batch; expected the mesh batch axes '
          f'{" x ".join(BATCH_AXES)} to split the batch across processes (e.g. the multi-process '
          'size on data or fsdp, not tensor)')


def _validate_mesh(mesh: MeshConfig, num_devices: int | None):
  _validate_axes('mesh.ici', mesh.ici)
  _validate_axes('mesh.dcn', mesh.dcn)
  if mesh.topology and not re.fullmatch(r'v\d+[a-z]*:[1-9]\d*(x[1-9]\d*)*', mesh.topology):
    _fail('mesh.topology', mesh.topology, "a TPU topology name such as 'v5e:2x2' or 'v5p:4x4x4' "
          "('' for none)")
  if mesh.rules not in RULE_PRESETS:
    _fail('mesh.rules', mesh.rules, f'one of {RULE_PRESETS}')
  _finite('mesh.hbm_gib', mesh.hbm_gib, 'a finite value >= 0 (0 = unknown)', lambda x: x >= 0)
  names = [p[0] for p in mesh.xla_options if isinstance(p, tuple) and len(p) == 2]
  if (len(names) != len(mesh.xla_options)
      or not all(isinstance(n, str) and re.fullmatch(r'xla_\w+', n) for n in names)
      or len(set(names)) != len(names)
      or not all(isinstance(v, (str, bool, int, float)) for _, v in mesh.xla_options)):
    _fail('mesh.xla_options', [list(p) if isinstance(p, tuple) else p for p in mesh.xla_options],
          '(name, value) pairs of distinct XLA options (xla_...) with a string, bool or number '
          'value, e.g. [["xla_cpu_prefer_vector_width", 512]]')
  if mesh.host_allocator not in hostmem.POLICIES:
    _fail('mesh.host_allocator', mesh.host_allocator, f'one of {tuple(hostmem.POLICIES)}')
  if num_devices is not None:
    resolve_mesh_shape(mesh.ici, mesh.dcn, num_devices)


def validate_preprocessing(d: DataConfig, m: ModelConfig):
  """Raises ConfigError naming the first field of `d` an image cannot be prepared with for the
  model `m` (intensity, resizing, image sizes, depth buckets, CT windows, percentiles): also for
  a DataConfig built in Python and passed to `generate`."""
  v = m.vision
  if d.intensity not in ('radfm', 'ct_window', 'ct_windows3', 'percentile'):
    _fail('data.intensity', d.intensity, "'radfm', 'ct_window', 'ct_windows3' or 'percentile'")
  if d.resize not in ('nearest', 'trilinear'):
    _fail('data.resize', d.resize, "'nearest' or 'trilinear'")
  if d.resize_2d not in ('bicubic', 'nearest'):
    _fail('data.resize_2d', d.resize_2d, "'bicubic' (the original's) or 'nearest'")
  for name in ('image_size_2d', 'image_size_3d_single'):
    size = getattr(d, name)
    if (not isinstance(size, numbers.Integral) or isinstance(size, bool) or size % v.patch_size
        or size > v.image_size or size <= 0):
      _fail(f'data.{name}', size, f'a positive multiple of model.vision.patch_size={v.patch_size} '
            f'no larger than model.vision.image_size={v.image_size}')
  _increasing_ints('data.depth_buckets', d.depth_buckets,
                   f'positive multiples of model.vision.frame_patch_size={v.frame_patch_size} '
                   f'no larger than model.vision.frames={v.frames}',
                   lambda x: 0 < x <= v.frames and x % v.frame_patch_size == 0)
  if not isinstance(d.ct_windows, (list, tuple)) or not d.ct_windows or any(
      not isinstance(w, (list, tuple)) or len(w) != 2 or not all(_real(x) for x in w)
      or w[1] <= 0 for w in d.ct_windows):
    _fail('data.ct_windows', d.ct_windows, '(level, width) pairs with width > 0')
  if d.intensity == 'ct_windows3' and len(d.ct_windows) < 3:
    _fail('data.ct_windows', d.ct_windows, "three (level, width) windows for intensity='ct_windows3'")
  if (not isinstance(d.percentiles, (list, tuple)) or len(d.percentiles) != 2
      or not all(_real(x) for x in d.percentiles)
      or not 0 <= d.percentiles[0] < d.percentiles[1] <= 100):
    _fail('data.percentiles', d.percentiles, '(low, high) with 0 <= low < high <= 100')


def _validate_data(d: DataConfig, m: ModelConfig):
  validate_preprocessing(d, m)
  if d.host_dtype not in ('float32', 'stored'):
    _fail('data.host_dtype', d.host_dtype, "'float32' or 'stored'")
  _positive('data', d, 'batch_size_2d', 'batch_size_3d', 'max_images')
  _non_negative('data', d, 'num_workers', note=' (0 = threads only)')
  _bool('data', d, 'shuffle', 'drop_unreadable', 'train_copies', 'random_crop_2d')
  _finite('data.max_unreadable_share', d.max_unreadable_share, 'a share in [0, 1] (1: never stop)',
          lambda x: 0 <= x <= 1)
  if d.max_images > m.max_images:
    _fail('data.max_images', d.max_images, f'at most model.max_images={m.max_images}')
  _validate_mixture(d.mixture)
  positions = m.llama.max_position_embeddings
  _increasing_ints('data.text_lengths', d.text_lengths,
                   f'lengths in [1, model.llama.max_position_embeddings={positions}]',
                   lambda x: 0 < x <= positions)


def _validate_mixture(mixture):
  shown = {p[0]: p[1] for p in mixture if isinstance(p, tuple) and len(p) == 2}
  if len(shown) != len(mixture) or not all(
      isinstance(name, str) and name and _real(w) and w >= 0 for name, w in shown.items()):
    _fail('data.mixture', [list(p) if isinstance(p, tuple) else p for p in mixture],
          "a mapping dataset -> weight (a finite number >= 0), each dataset once, e.g. "
          "{'vqa_rad': 2.0, 'slake': 1.0}; empty = proportional to size")
  if mixture and not any(w > 0 for w in shown.values()):
    _fail('data.mixture', shown, 'at least one weight > 0')


def mixture_weights(d: DataConfig) -> dict[str, float] | None:
  """data.mixture as {dataset: weight}, or None when empty (proportional to size)."""
  return {name: float(w) for name, w in d.mixture} or None


def validate_generate(g: GenerateConfig):
  """Raises ConfigError naming the first generate field decoding cannot use (also for a
  GenerateConfig built in Python, e.g. with `dataclasses.replace`)."""
  _positive('generate', g, 'max_new_tokens')
  if not isinstance(g.stop_ids, (list, tuple)) or any(not _is_int(i) or i < 0 for i in g.stop_ids):
    _fail('generate.stop_ids', list(g.stop_ids) if isinstance(g.stop_ids, tuple) else g.stop_ids,
          'a list of token ids (integers >= 0); [] = never stop early')
  _finite('generate.temperature', g.temperature, 'a finite value >= 0 (0 means greedy)',
          lambda x: x >= 0)
  _non_negative('generate', g, 'top_k', note=' (0 means no top-k filter)')
  _finite('generate.top_p', g.top_p, 'a value in (0, 1]', lambda x: 0 < x <= 1)
  if g.layer_loop not in ('auto', 'scan', 'unrolled'):
    _fail('generate.layer_loop', g.layer_loop, "one of 'auto', 'scan', 'unrolled'")
  if g.cpu_product not in CPU_PRODUCTS:
    _fail('generate.cpu_product', g.cpu_product, f'one of {CPU_PRODUCTS}')
  if g.image_shape not in IMAGE_SHAPES:
    _fail('generate.image_shape', g.image_shape, f'one of {IMAGE_SHAPES}')
  _non_negative('generate', g, 'cache_chunk', note=' (0 = no chunks)')


def _validate_train(t: TrainConfig):
  _positive('train', t, 'steps', 'grad_accum', 'log_every', 'eval_steps', 'keep_checkpoints')
  _finite('train.learning_rate', t.learning_rate, 'a finite value > 0', lambda x: x > 0)
  if t.warmup_steps != -1 and not 0 <= t.warmup_steps < t.steps:
    _fail('train.warmup_steps', t.warmup_steps,
          f'0 <= warmup_steps < train.steps={t.steps}, or -1 (automatic: min(100, steps // 10))')
  _finite('train.min_lr_ratio', t.min_lr_ratio, 'a value in [0, 1]', lambda x: 0 <= x <= 1)
  for name in ('b1', 'b2'):
    _finite(f'train.{name}', getattr(t, name), 'a value in [0, 1)', lambda x: 0 <= x < 1)
  _finite('train.eps', t.eps, 'a finite value > 0 (Adam divides by it)', lambda x: x > 0)
  for name in ('weight_decay', 'max_grad_norm', 'peak_tflops'):
    _finite(f'train.{name}', getattr(t, name), 'a finite value >= 0', lambda x: x >= 0)
  _non_negative('train', t, 'eval_every', 'checkpoint_every', 'synthetic_length',
                note=' (0 = off / default)')
  _positive('train', t, 'synthetic_images')
  _bool('train', t, 'async_checkpoint', 'tensorboard')
  if t.loss not in ('mean', 'weighted'):
    _fail('train.loss', t.loss, "'mean' (token-mean CE, the original's loss) or 'weighted'")
  bad = [f for f in t.freeze if f not in FREEZE_GROUPS]
  if bad:
    _fail('train.freeze', list(t.freeze), f'names from {sorted(FREEZE_GROUPS)}')
  for pair in t.lr_multipliers:
    if not (isinstance(pair, tuple) and len(pair) == 2 and _regex(pair[0]) and _real(pair[1])
            and pair[1] > 0):
      _fail('train.lr_multipliers', [list(p) if isinstance(p, tuple) else p
                                     for p in t.lr_multipliers],
            '(regex, multiplier) pairs with a finite multiplier > 0, e.g. [["vision/.*", 10.0]]')
  for pair in t.lr_delays:
    if not (isinstance(pair, tuple) and len(pair) == 2 and _regex(pair[0]) and _is_int(pair[1])
            and pair[1] >= 0):
      _fail('train.lr_delays', [list(p) if isinstance(p, tuple) else p for p in t.lr_delays],
            '(regex, steps) pairs with an integer number of steps >= 0, e.g. '
            '[["llama/layers/.*", 200]]')


def _regex(pattern) -> bool:
  """A string that compiles as a Python regular expression."""
  if not isinstance(pattern, str):
    return False
  try:
    re.compile(pattern)
  except re.error:
    return False
  return True


def validate_finetune(f: FinetuneConfig):
  if f.method not in ('full', 'lora', 'qlora'):
    _fail('finetune.method', f.method, "'full', 'lora' or 'qlora'")
  _positive('finetune', f, 'rank')
  _finite('finetune.alpha', f.alpha, 'a finite value > 0', lambda x: x > 0)
  _finite('finetune.dropout', f.dropout, 'a probability in [0, 1)', lambda x: 0 <= x < 1)
  if not all(_regex(p) for p in f.targets) or (f.method != 'full' and not f.targets):
    _fail('finetune.targets', list(f.targets), 'regexes of module paths (e.g. llama/layers/q)')
  bad = [n for n in f.train_full if n not in FREEZE_GROUPS]
  if bad:
    _fail('finetune.train_full', list(f.train_full), f'names from {sorted(FREEZE_GROUPS)}')
  if f.quant not in ('int8', 'int4'):
    _fail('finetune.quant', f.quant, "'int8' or 'int4'")
  if not isinstance(f.init_from, str):
    _fail('finetune.init_from', f.init_from, "a checkpoint folder, or '' for random weights")
  # Fields the method does not read would be taken and do nothing.
  default = FinetuneConfig()
  unread = {'full': ('rank', 'alpha', 'dropout', 'targets', 'train_full', 'quant'),
            'lora': ('quant',), 'qlora': ()}[f.method]
  for name in unread:
    value, usual = (list(v) if isinstance(v, tuple) else v
                    for v in (getattr(f, name), getattr(default, name)))
    if value != usual:
      readers = "'qlora'" if name == 'quant' else "'lora' and 'qlora'"
      _fail(f'finetune.{name}', value, f'the default ({usual!r}) with '
            f'finetune.method={f.method!r}: only {readers} read it')


def _check_train_full_not_frozen(f: FinetuneConfig, t: TrainConfig):
  """finetune.train_full names towers to train in full; train.freeze freezing one of them would
  undo it in silence (the trainable set is the adapters and train_full minus train.freeze)."""
  full = {n for group in f.train_full for n in FREEZE_GROUPS[group]}
  frozen = {n for group in t.freeze for n in FREEZE_GROUPS[group]}
  both = sorted(full & frozen)
  if both:
    _fail('train.freeze', list(t.freeze), f'no tower that finetune.train_full='
          f'{list(f.train_full)!r} trains in full ({", ".join(both)} are in both)')


def _validate_image_cache(d: DataConfig, m: ModelConfig, t: TrainConfig):
  """data.image_cache trains on tokens the frozen vision tower made once: refused unless that
  tower is frozen and its path is deterministic (data/image_cache.py: exactness)."""
  if not d.image_cache:
    return
  if d.store == SYNTHETIC_STORE:
    _fail('data.image_cache', True, f'False with data.store={SYNTHETIC_STORE} (random batches '
          'have no scans whose image tokens could be cached)')
  frozen = {name for group in t.freeze for name in FREEZE_GROUPS[group]}
  missing = [n for n in FREEZE_GROUPS['vision_tower'] if n not in frozen]
  if missing:
    _fail('train.freeze', list(t.freeze), f'the vision tower frozen (add {missing} or '
          "'vision_tower') when data.image_cache=True")
  sections = {'model': m, 'data': d, 'train': t}
  for field, value in IMAGE_CACHE_DETERMINISTIC.items():
    head, *rest = field.split('.')
    now = sections[head]
    for name in rest:
      now = getattr(now, name)
    if now != value:
      _fail(field, now, f'{value!r} when data.image_cache=True (cached image tokens are exact '
            'only for a deterministic image path)')


def _build_model(m: ml_collections.ConfigDict) -> ModelConfig:
  model = _build(ModelConfig,
                 {k: v for k, v in m.items() if k not in ('vision', 'perceiver', 'llama')}, 'model',
                 vision=_build(VisionConfig, m.get('vision'), 'model.vision'),
                 perceiver=_build(PerceiverConfig, m.get('perceiver'), 'model.perceiver'),
                 llama=_build(LlamaConfig, m.get('llama'), 'model.llama'))
  validate_model(model)
  return model


def model_config_from_dict(section) -> ModelConfig:
  """A `model` section alone (a dict as saved in a checkpoint's config.json; missing fields take
  the defaults) -> validated ModelConfig. ConfigError names a bad or unknown field."""
  return _build_model(with_defaults({'model': dict(section)}).model)


def validate(cfg: ml_collections.ConfigDict | dict, num_devices: int | None = None) -> Config:
  """ConfigDict (all fields, or only those that differ from the defaults) -> frozen `Config`;
  raises `ConfigError` naming the field on any bad value."""
  cfg = with_defaults(cfg)
  model = _build_model(cfg.model)
  mesh = _build(MeshConfig, cfg.get('mesh'), 'mesh')
  _validate_mesh(mesh, num_devices)
  data = _build(DataConfig, cfg.get('data'), 'data')
  _validate_data(data, model)
  generate = _build(GenerateConfig, cfg.get('generate'), 'generate')
  validate_generate(generate)
  train = _build(TrainConfig, cfg.get('train'), 'train')
  _validate_train(train)
  finetune = _build(FinetuneConfig, cfg.get('finetune'), 'finetune')
  validate_finetune(finetune)
  _check_train_full_not_frozen(finetune, train)
  _validate_image_cache(data, model, train)
  if not is_seed(cfg.seed):
    _fail('seed', cfg.seed, 'an integer in [0, 2^32) (a JAX key takes 32 bits: 2^32 would be '
          'the run of seed 0)')
  extra = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k not in _SCHEMA_FIELDS})
  extra.lock()
  return Config(model=model, mesh=mesh, data=data, generate=generate, train=train,
                finetune=finetune, seed=cfg.seed, extra=extra, source=cfg)


def model_config(size: str = 'tiny', **overrides) -> ModelConfig:
  """A validated ModelConfig for one size of `radfm_jax/presets.py` on the `cpu` preset (for
  notebooks and tests); `overrides` name model fields, nested ones dotted:
  `model_config('tiny', **{'llama.vocab_size': 1024}, compute_dtype='bfloat16')`."""
  try:
    cfg = with_defaults(presets.select(model=size))
  except ValueError as e:            # presets.select: 'config arg model=...: expected one of'
    raise ConfigError(str(e)) from e
  apply_overrides(cfg, [f'model.{key}={value!r}' for key, value in overrides.items()])
  return validate(cfg).model
