"""Config loading and validation: every bad value names its field and the expected value."""

import os
import re
import subprocess
import sys

import pytest

from radfm_jax import presets
from radfm_jax.config import (EXPERIMENTS_DIR, ConfigError, builtin_experiments, defaults,
                              import_config_file, load_config, model_config, validate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPEC = 'configs/radfm.py:model=tiny,mesh=cpu'


def test_presets_load_and_13b_sizes_are_official():
  cfg = load_config('configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_128', num_devices=64)
  v, p, l = cfg.model.vision, cfg.model.perceiver, cfg.model.llama
  assert (v.image_size, v.frames, v.patch_size, v.frame_patch_size) == (512, 512, 32, 4)
  assert (v.dim, v.depth, v.heads, v.head_dim, v.mlp_dim, v.patch_dim) == (768, 12, 8, 64, 2048, 12288)
  assert v.pos_rows == (16, 16, 128)
  assert (p.depth, p.heads, p.head_dim, p.num_latents, p.ff_mult) == (6, 8, 64, 32, 4)
  # the demo's vision recipe switches default to the original (torch LayerNorm eps, randn latents,
  # uniform(0, 1) position tables)
  assert (v.patch_norm_eps, p.latent_init_std, v.pos_init_scale) == (1e-5, 1.0, 1.0)
  assert (l.hidden_size, l.intermediate_size, l.num_layers, l.num_heads, l.head_dim,
          l.vocab_size) == (5120, 13824, 40, 40, 128, 32000)
  assert (l.rms_norm_eps, l.rope_theta) == (1e-6, 10000.0)
  assert cfg.model.compute_dtype == 'bfloat16' and cfg.mesh.topology == 'v5p:4x4x4'
  assert cfg.generate.stop_ids == (2, 1)


def test_overrides_are_typed():
  cfg = load_config(SPEC, ['model.llama.num_layers=3', 'generate.stop_ids=[1]',
                           'model.remat_policy=dots_saveable', 'generate.top_p=1'])
  assert cfg.model.llama.num_layers == 3
  assert cfg.generate.stop_ids == (1,)
  assert cfg.model.remat_policy == 'dots_saveable'
  assert isinstance(cfg.generate.top_p, float)



def test_a_comma_string_keeps_the_commas_of_a_regex():
  """A list field given as a comma string is cut at its commas outside brackets only: a regex's
  own ('{1,2}', '[,;]') stays in its pattern (both halves of a cut one compile, so a cut was a
  silently different set of targets)."""
  lora = SPEC + ',finetune=lora'                  # the method that reads finetune.targets
  cfg = load_config(lora, ['finetune.targets=llama/layers/(q|k){1,2},fc', 'train.freeze=vision,fc',
                           r'train.lr_multipliers=[["vision/.*", 2]]'])
  assert cfg.finetune.targets == ('llama/layers/(q|k){1,2}', 'fc')
  assert cfg.train.freeze == ('vision', 'fc')
  assert load_config(lora, [r'finetune.targets=[,;]x,a\(,b']).finetune.targets == (
      '[,;]x', r'a\(', 'b')


def test_finetune_fields_the_method_does_not_read_are_refused():
  """finetune.rank / alpha / dropout / targets / train_full with method 'full', quant with
  'lora', were taken and did nothing; a tower both in finetune.train_full and train.freeze was
  frozen in silence."""
  cases = [
      (SPEC, 'finetune.rank=4', "config field finetune.rank=4: expected the default (8) with "
       "finetune.method='full': only 'lora' and 'qlora' read it"),
      (SPEC, "finetune.targets=['zzz']", "config field finetune.targets=['zzz']: expected the "
       "default (['llama/layers/(q|k|v|o|gate|up|down)']) with finetune.method='full'"),
      (SPEC, 'finetune.train_full=vision', "config field finetune.train_full=['vision']: "
       "expected the default ([]) with finetune.method='full'"),
      (SPEC + ',finetune=lora', 'finetune.quant=int4', "config field finetune.quant='int4': "
       "expected the default ('int8') with finetune.method='lora': only 'qlora' read it")]
  for spec, override, message in cases:
    with pytest.raises(ConfigError) as e:
      load_config(spec, [override])
    assert str(e.value).startswith(message), str(e.value)
  assert load_config(SPEC + ',finetune=qlora', ['finetune.quant=int4']).finetune.quant == 'int4'
  with pytest.raises(ConfigError, match=re.escape(
      "config field train.freeze=['vision_tower']: expected no tower that finetune.train_full="
      "['vision'] trains in full (vision are in both)")):
    load_config(SPEC + ',finetune=lora', ['finetune.train_full=vision',
                                          'train.freeze=vision_tower'])


def test_an_experiment_key_that_is_not_a_string_is_one_error(tmp_path):
  path = tmp_path / 'exp.py'
  path.write_text('def get_config(arg):\n  return {"train": {3: 1}}\n')
  with pytest.raises(ConfigError, match=r'^config section train: key 3 of type int; expected '
                     r'field names \(strings\)$'):
    load_config(str(path))
  with pytest.raises(ConfigError, match='config top level: key None of type NoneType'):
    validate({None: {}})


def test_an_experiment_file_calling_sys_exit_is_one_error(tmp_path):
  """A sys.exit in an experiment file ended the command with that code and no message."""
  top = tmp_path / 'top.py'
  top.write_text('import sys\nsys.exit(3)\n')
  with pytest.raises(ConfigError, match=rf'^config file {top} line 2: SystemExit: 3$'):
    load_config(str(top))
  inner = tmp_path / 'inner.py'
  inner.write_text('import sys\n\ndef get_config(arg):\n  sys.exit("no such size")\n')
  with pytest.raises(ConfigError, match=rf'^config file {inner} line 4: SystemExit: no such size$'):
    load_config(str(inner))

@pytest.mark.parametrize('override,field,expected', [
    ('model.vision.image_size=70', 'model.vision.image_size=70', 'multiple of model.vision.patch_size=16'),
    ('model.vision.frames=18', 'model.vision.frames=18', 'multiple of model.vision.frame_patch_size=4'),
    ('model.llama.num_heads=5', 'model.llama.num_heads=5', 'divisor of model.llama.hidden_size=64'),
    ('model.vision.dim=50', 'model.vision.dim=50', 'multiple of 3'),
    ('model.remat_policy=bogus', 'model.remat_policy=', 'one of'),
    ('model.compute_dtype=int8', 'model.compute_dtype=', 'one of'),
    ('model.dense_backward=fast', 'model.dense_backward=', "one of ('autodiff', 'transposed')"),
    ('mesh.rules=zero3', 'mesh.rules=', "one of ('fsdp', 'fsdp_tp')"),
    ('data.depth_buckets=[4,6]', 'data.depth_buckets=', 'multiples of model.vision.frame_patch_size=4'),
    ('data.image_size_2d=40', 'data.image_size_2d=40', 'multiple of model.vision.patch_size=16'),
    ('generate.top_p=0', 'generate.top_p=0', '(0, 1]'),
    ('generate.layer_loop=python', 'generate.layer_loop=', "'unrolled'"),
    ('generate.cache_chunk=-1', 'generate.cache_chunk=-1', 'integer >= 0'),
    ('generate.cpu_product=fast', 'generate.cpu_product=', "one of ('auto', 'panels', 'xla')"),
    ('generate.image_shape=test', 'generate.image_shape=', "one of ('original', 'train')"),
    ('model.vision.depth=0', 'model.vision.depth=0', 'positive integer'),
    ('model.vision.patch_norm_eps=0', 'model.vision.patch_norm_eps=0', 'finite value > 0'),
    ('model.perceiver.latent_init_std=-1', 'model.perceiver.latent_init_std=-1',
     'finite value > 0'),
    ('model.vision.pos_init_scale=0', 'model.vision.pos_init_scale=0', 'finite value > 0'),
    ("mesh.xla_options=[['cpu_prefer_vector_width', 512]]", 'mesh.xla_options=',
     'pairs of distinct XLA options (xla_...)'),
    ("mesh.xla_options=[['xla_cpu_prefer_vector_width', [512]]]", 'mesh.xla_options=',
     'a string, bool or number value'),
    ('mesh.host_allocator=jemalloc', "mesh.host_allocator='jemalloc'",
     "one of ('system', 'hugepages', 'keep')"),
])
def test_bad_values_name_field_and_expectation(override, field, expected):
  with pytest.raises(ConfigError) as err:
    load_config(SPEC, [override])
  assert field in str(err.value) and expected in str(err.value)


def test_mesh_product_must_match_device_count():
  with pytest.raises(ConfigError, match=r'mesh.ici.*product is 8, got 4'):
    load_config(SPEC, ["mesh.ici=[['data', 2], ['fsdp', 2], ['tensor', 1]]"], num_devices=8)
  with pytest.raises(ConfigError, match=r'mesh.ici.*divides 8 devices'):
    load_config(SPEC, ["mesh.ici=[['data', 3], ['fsdp', -1], ['tensor', 1]]"], num_devices=8)
  with pytest.raises(ConfigError, match='at most one -1'):
    load_config(SPEC, ["mesh.ici=[['data', -1], ['fsdp', -1], ['tensor', 1]]"])
  ok = load_config(SPEC, ["mesh.ici=[['data', 2], ['fsdp', -1], ['tensor', 2]]"], num_devices=8)
  assert ok.mesh.ici == (('data', 2), ('fsdp', -1), ('tensor', 2))


def test_unknown_fields_and_args_are_rejected():
  with pytest.raises(ConfigError, match='no config field model.llama.hiden_size'):
    load_config(SPEC, ['model.llama.hiden_size=8'])
  with pytest.raises(ValueError, match="model='huge'"):
    load_config('configs/radfm.py:model=huge')
  with pytest.raises(ConfigError, match='does not exist'):
    load_config('configs/nope.py')


def test_model_config_helper():
  assert model_config('tiny', compute_dtype='bfloat16').compute_dtype == 'bfloat16'


def test_presets_list_only_differences_and_13b_is_the_defaults():
  assert presets.MODEL_SIZES['radfm_13b'] == {}
  assert validate({}).model == model_config('radfm_13b', remat_policy='nothing_saveable',
                                            dense_backward='autodiff')
  # No preset repeats a default: every listed value differs from the dataclass default.
  full = defaults().to_dict()
  def repeats(diff, base, prefix=''):
    for key, value in diff.items():
      if isinstance(value, dict):
        yield from repeats(value, base[key], f'{prefix}{key}.')
      elif value == base[key]:
        yield prefix + key
  for name, diff in {**presets.MODEL_SIZES, **presets.HARDWARE}.items():
    assert list(repeats(diff, full)) == [], name


def test_xla_options_are_a_hardware_field():
  """The XLA compiler options are the hardware preset's to choose (`mesh.xla_options`); every
  preset keeps XLA's own (none measured better on its platform: docs/performance.md), and a
  mapping on the command line is taken as (name, value) pairs in its order."""
  for preset in presets.HARDWARE:
    assert load_config(f'configs/radfm.py:model=tiny,mesh={preset}').mesh.xla_options == ()
  cfg = load_config(SPEC, ['mesh.xla_options={"xla_cpu_prefer_vector_width": 512, '
                           '"xla_cpu_enable_fast_min_max": False}'])
  assert cfg.mesh.xla_options == (('xla_cpu_prefer_vector_width', 512),
                                  ('xla_cpu_enable_fast_min_max', False))


def test_host_allocator_is_a_hardware_field():
  """Only the `cpu` preset changes glibc's handling of XLA's buffers (huge pages:
  `mesh.host_allocator='hugepages'`, radfm_jax/hostmem.py); the accelerator presets, and the
  defaults, leave glibc's own."""
  for preset in presets.HARDWARE:
    cfg = load_config(f'configs/radfm.py:model=tiny,mesh={preset}')
    assert cfg.mesh.host_allocator == ('hugepages' if preset == 'cpu' else 'system'), preset
  assert validate({}).mesh.host_allocator == 'system'
  assert load_config('configs/demo.py').mesh.host_allocator == 'hugepages'
  assert load_config(SPEC, ['mesh.host_allocator=keep']).mesh.host_allocator == 'keep'


def test_experiment_file_lists_only_what_differs():
  diff = import_config_file('configs/radfm.py').get_config('model=tiny,mesh=cpu').to_dict()
  assert diff['train'] == {} and diff['generate'] == {}
  assert diff['mesh'] == {'preset': 'cpu', 'host_allocator': 'hugepages'}
  assert diff['model']['remat_policy'] == 'none' and 'compute_dtype' not in diff['model']
  cfg = load_config(SPEC)
  assert (cfg.train.steps, cfg.train.learning_rate, cfg.generate.stop_ids) == (1000, 1e-4, (2, 1))
  assert (cfg.data.image_size_2d, cfg.data.image_size_3d_single) == (64, 32)
  assert cfg.data.depth_buckets == (4, 8, 12, 16) and cfg.data.text_lengths == (256, 512, 1024)


def test_overrides_of_unlisted_fields_use_the_schema():
  cfg = load_config(SPEC, ['train.b2=0.95', 'train.steps=3', 'train.warmup_steps=0',
                           'data.num_workers=2', 'train.freeze=vision,fc', 'mesh.hbm_gib=16',
                           'train.async_checkpoint=False'])
  assert (cfg.train.b2, cfg.train.steps, cfg.data.num_workers) == (0.95, 3, 2)
  assert cfg.train.freeze == ('vision', 'fc') and cfg.mesh.hbm_gib == 16.0
  assert isinstance(cfg.mesh.hbm_gib, float) and cfg.train.async_checkpoint is False
  with pytest.raises(ConfigError, match=r'no config field train\.stepz'):
    load_config(SPEC, ['train.stepz=3'])
  with pytest.raises(ConfigError, match=r'train\.tensorboard=1: expected a value of type bool'):
    load_config(SPEC, ['train.tensorboard=1'])
  with pytest.raises(ConfigError, match=r'model\.llama is a section'):
    load_config(SPEC, ['model.llama=3'])


def test_validate_accepts_a_partial_config_and_checks_names():
  cfg = validate({'model': {'llama': {'num_layers': 3}}, 'train': {'steps': 900}, 'seed': 4})
  assert (cfg.model.llama.num_layers, cfg.model.llama.hidden_size) == (3, 5120)
  assert (cfg.train.steps, cfg.seed, cfg.mesh.ici) == (900, 4, (('data', 1), ('fsdp', -1),
                                                               ('tensor', 1)))
  with pytest.raises(ConfigError, match=r'config field train\.stepz: no such field'):
    validate({'train': {'stepz': 9}})
  with pytest.raises(ConfigError, match=r'config field model\.vision\.dim=.*expected a value of type int'):
    validate({'model': {'vision': {'dim': 'wide'}}})
  with pytest.raises(ConfigError, match='config field nmae: no such field'):
    validate({'nmae': 'x'})


def test_saved_config_is_the_full_resolved_config():
  saved = load_config('configs/demo.py:model=tiny', ['train.steps=70']).to_dict()
  full = defaults().to_dict()
  assert set(saved) == set(full) | {'demo'} and saved['demo'] == {'closed_first': 0.4,
                                                              'decoder_delay': 0.5}
  for section in ('model', 'mesh', 'data', 'generate', 'train'):
    assert set(saved[section]) == set(full[section]), section
  assert saved['train']['steps'] == 70 and saved['train']['b1'] == 0.9
  assert saved['model']['llama']['rope_theta'] == 10000.0
  assert validate(saved) == load_config('configs/demo.py:model=tiny', ['train.steps=70'])


def test_builtin_experiments_resolve_from_any_directory(tmp_path, monkeypatch):
  here = load_config('configs/radfm.py:model=tiny,mesh=tpu_v5p_16')
  monkeypatch.chdir(tmp_path)
  assert load_config('configs/radfm.py:model=tiny,mesh=tpu_v5p_16') == here
  assert load_config('radfm:model=tiny,mesh=tpu_v5p_16') == here
  assert load_config('radfm.py:model=tiny,mesh=tpu_v5p_16') == here
  demo = load_config('demo:model=tiny')
  assert (demo.train.steps, demo.data.text_lengths) == (800, (80,))
  assert demo.extra.demo.closed_first == 0.4
  assert builtin_experiments() == ['demo', 'radfm']
  with pytest.raises(ConfigError, match="'elsewhere/radfm.py' does not exist.*demo, radfm"):
    load_config('elsewhere/radfm.py')
  # A file that exists wins over the built-in of the same name.
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'radfm.py').write_text(
      'def get_config(arg):\n  return {"train": {"steps": 5, "warmup_steps": 0}}\n')
  mine = load_config('configs/radfm.py')
  assert mine.train.steps == 5 and mine.model.size == 'radfm_13b'


def test_user_configs_are_the_builtin_experiments():
  # configs/NAME.py are links to the packaged files: one source, shown where users look for it.
  names = sorted(f for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py'))
  assert names == [f'{n}.py' for n in builtin_experiments()]
  for name in names:
    assert os.path.realpath(os.path.join(ROOT, 'configs', name)) == os.path.realpath(
        os.path.join(EXPERIMENTS_DIR, name)), f'configs/{name} is not radfm_jax/experiments/{name}'


def test_model_config_from_presets():
  tiny = model_config('tiny', **{'llama.vocab_size': 1024})
  assert (tiny.size, tiny.llama.vocab_size, tiny.llama.hidden_size, tiny.remat_policy) == (
      'tiny', 1024, 64, 'none')
  assert (tiny.vision.image_size, tiny.vision.frames, tiny.vision.patch_size) == (64, 16, 16)
  with pytest.raises(ValueError, match="model='huge'"):
    model_config('huge')


def test_mesh_shape_arithmetic_needs_no_jax():
  code = ('import sys; from radfm_jax.config import resolve_mesh_shape as r; '
          "print(r([['data', 1], ['fsdp', 8], ['tensor', 1]], [['data', -1], ['fsdp', 1], "
          "['tensor', 1]], 32, num_slices=4), 'jax' in sys.modules)")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '((1, 8, 1), (4, 1, 1)) False'
