"""Config loading and validation: every bad value names its field and the expected value."""

import pytest

from radfm_jax.config import ConfigError, load_config, model_config

SPEC = 'configs/radfm.py:model=tiny,mesh=cpu'


def test_presets_load_and_13b_sizes_are_official():
  cfg = load_config('configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_128', num_devices=64)
  v, p, l = cfg.model.vision, cfg.model.perceiver, cfg.model.llama
  assert (v.image_size, v.frames, v.patch_size, v.frame_patch_size) == (512, 512, 32, 4)
  assert (v.dim, v.depth, v.heads, v.head_dim, v.mlp_dim, v.patch_dim) == (768, 12, 8, 64, 2048, 12288)
  assert v.pos_rows == (16, 16, 128)
  assert (p.depth, p.heads, p.head_dim, p.num_latents, p.ff_mult) == (6, 8, 64, 32, 4)
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


@pytest.mark.parametrize('override,field,expected', [
    ('model.vision.image_size=70', 'model.vision.image_size=70', 'multiple of model.vision.patch_size=16'),
    ('model.vision.frames=18', 'model.vision.frames=18', 'multiple of model.vision.frame_patch_size=4'),
    ('model.llama.num_heads=5', 'model.llama.num_heads=5', 'divisor of model.llama.hidden_size=64'),
    ('model.vision.dim=50', 'model.vision.dim=50', 'multiple of 3'),
    ('model.remat_policy=bogus', 'model.remat_policy=', 'one of'),
    ('model.compute_dtype=int8', 'model.compute_dtype=', 'one of'),
    ('mesh.rules=zero3', 'mesh.rules=', "one of ('fsdp', 'fsdp_tp')"),
    ('data.depth_buckets=[4,6]', 'data.depth_buckets=', 'multiples of model.vision.frame_patch_size=4'),
    ('data.image_size_2d=40', 'data.image_size_2d=40', 'multiple of model.vision.patch_size=16'),
    ('generate.top_p=0', 'generate.top_p=0', '(0, 1]'),
    ('generate.layer_loop=python', 'generate.layer_loop=', "'unrolled'"),
    ('generate.cache_chunk=-1', 'generate.cache_chunk=-1', 'integer >= 0'),
    ('model.vision.depth=0', 'model.vision.depth=0', 'positive integer'),
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
