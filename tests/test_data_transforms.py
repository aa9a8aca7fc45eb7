"""Resizing (torch-legacy parity), RadFM shape buckets and intensity policies."""

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.data import transforms as T


def test_nearest_golden_indices():
  # torch legacy nearest: floor(dst * in / out); jax.image.resize would give 1, 3, 6, 8.
  np.testing.assert_array_equal(T.nearest_indices(10, 4), [0, 2, 5, 7])
  np.testing.assert_array_equal(T.nearest_indices(3, 8), [0, 0, 0, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(T.nearest_indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(T.nearest_indices(7, 7), np.arange(7))
  np.testing.assert_array_equal(T.nearest_indices(1, 4), [0, 0, 0, 0])


@pytest.mark.parametrize('n_in,n_out', [(10, 4), (512, 256), (300, 64), (137, 512), (6, 4),
                                        (1, 4), (33, 32), (97, 61), (1000, 999)])
def test_nearest_matches_the_index_formula(n_in, n_out):
  # The float32 formula of ATen's CPU kernel, evaluated independently in float64 where it is exact.
  got = T.nearest_indices(n_in, n_out)
  want = np.minimum(np.floor(np.arange(n_out) * np.float64(np.float32(n_in / n_out))), n_in - 1)
  if n_out == 2 * n_in:
    want = np.arange(n_out) // 2
  assert np.abs(got - want).max() <= (0 if n_in < 2 ** 12 else 1)
  assert got.min() >= 0 and got.max() <= n_in - 1


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 13, 10, 7)).astype(np.float32)
  for shape in [(8, 8, 4), (32, 16, 12), (13, 10, 7), (5, 20, 3)]:
    ref = F.interpolate(torch.from_numpy(x)[None], size=shape, mode='nearest')[0].numpy()
    np.testing.assert_array_equal(T.resize(x, shape, 'nearest'), ref)
    ref = F.interpolate(torch.from_numpy(x)[None], size=shape, mode='trilinear',
                        align_corners=False)[0].numpy()
    np.testing.assert_allclose(T.resize(x, shape, 'trilinear'), ref, atol=1e-5)


def test_resize_nearest_keeps_dtype_and_values():
  x = np.arange(2 * 10 * 4 * 1, dtype=np.int16).reshape(2, 10, 4, 1)
  y = T.resize(x, (4, 4, 4), 'nearest')
  assert y.dtype == np.int16 and y.shape == (2, 4, 4, 4)
  np.testing.assert_array_equal(y[:, :, :, 3], x[:, [0, 2, 5, 7]][..., 0])   # depth 1 -> 4 copies


def test_depth_bucket_rule():
  buckets = tuple(range(4, 65, 4))
  cases = {1: 4, 4: 4, 5: 4, 6: 4, 7: 8, 10: 8, 11: 12, 14: 12, 15: 16, 62: 60, 63: 64, 64: 64,
           65: 64, 300: 64}
  assert {d: T.depth_bucket(d, buckets) for d in cases} == cases


def test_sample_shape_rules():
  cfg = cd.data_config(image_size_2d=64, image_size_3d_single=32,
                       depth_buckets=tuple(range(4, 65, 4)))
  assert T.sample_shape([1, 1], cfg, batch_size=4) == (64, 64, 4)          # 2D -> size_2d x 4
  assert T.sample_shape([30], cfg, batch_size=1) == (32, 32, 28)          # single 3D -> reduced
  assert T.sample_shape([5], cfg, batch_size=1) == (64, 64, 4)            # D bucket 4 -> full size
  assert T.sample_shape([30], cfg, batch_size=2) == (64, 64, 28)          # not a single sample
  assert T.sample_shape([60] * 7, cfg, batch_size=1) == (32, 32, 32)      # > 6 images: D <= 32
  assert T.sample_shape([], cfg, batch_size=4) == (64, 64, 4)             # no images


def _original_stack_then_collate(case, size_2d, size_3d, buckets):
  """torch transcription of the original's 3D training path for one sample (a batch of one):
  min-max over the case, multi_dataset.stack_images (F.interpolate to (512, 512, D) with D the
  D_list 4..64 bucket of the deepest image), then train.py DataCollator (a single sample with more
  than 6 images: D_list 4..32; single sample and D > 4: 256 x 256; F.interpolate again)."""
  import torch
  F = torch.nn.functional

  def bucket(depth, d_list):
    target = 4
    for b in d_list:
      if abs(b - depth) < abs(target - depth):
        target = b
    return target

  xs = [torch.from_numpy(s.astype(np.float32)) for s in case]      # S x [C, H, W, D]
  lo, hi = min(s.min() for s in xs), max(s.max() for s in xs)
  xs = [(s - lo) / (hi - lo) for s in xs]
  d1 = bucket(max([4] + [s.shape[-1] for s in xs]), buckets)
  stacked = torch.cat([F.interpolate(s[None], size=(size_2d, size_2d, d1)) for s in xs])
  d_list = [b for b in buckets if b <= 32] if len(xs) > 6 else buckets
  d2 = bucket(stacked.shape[-1], d_list)
  hw = size_3d if d2 > 4 else size_2d
  out = F.interpolate(stacked, size=(hw, hw, d2))
  return out.expand(-1, 3, -1, -1, -1).numpy()


def test_more_than_6_images_resize_depth_twice_as_the_original():
  """A batch of one sample with > 6 images: the original stacks to the 4..64 bucket (50 -> 48)
  and its collator resizes that to the 4..32 bucket (48 -> 32); one resize 50 -> 32 picks other
  slices (14 where the original has 13). prepare_images reproduces the two (transforms.
  stack_depth, depth_indices), also from an image given already at the bucket's depth (a
  training-resolution copy, data/pipeline.py) when told the sample's stack depth."""
  torch = pytest.importorskip('torch')
  buckets = tuple(range(4, 65, 4))
  cfg = cd.data_config(image_size_2d=64, image_size_3d_single=32, depth_buckets=buckets)
  rng = np.random.default_rng(0)
  case = rng.normal(0, 300, size=(7, 1, 20, 18, 50)).astype(np.int16)
  want = _original_stack_then_collate(case, 64, 32, buckets)
  shape = T.sample_shape([50] * 7, cfg, batch_size=1)
  assert shape == (32, 32, 32) and want.shape == (7, 3, 32, 32, 32)
  images = list(case)
  np.testing.assert_array_equal(T.prepare_images(images, [''] * 7, shape, cfg), want)
  one_step = torch.nn.functional.interpolate(torch.arange(50.)[None, None], size=32)[0, 0]
  assert not np.array_equal(one_step.numpy(), T.depth_indices(50, 32, 48))   # a real difference
  assert T.stack_depth([50] * 7, cfg) == 48
  # slices read first at the stack depth (a training-resolution copy, data/pipeline.py), or an
  # image already at the batch's depth (32 -> 48 -> 32 is not the identity): as the original
  picked = [x[..., T.nearest_indices(50, 48)] for x in images]
  ranges = [T.value_range(case)] * 7
  np.testing.assert_array_equal(
      T.prepare_images(picked, [''] * 7, shape, cfg, ranges=ranges, stacked_depth=48), want)
  mixed = [case[0][..., :32]] + images[1:]
  want = _original_stack_then_collate(mixed, 64, 32, buckets)
  np.testing.assert_array_equal(T.prepare_images(mixed, [''] * 7, shape, cfg), want)


def test_radfm_policy_is_whole_sample_min_max():
  a = np.array([0, 10, 20, 30], np.int16).reshape(1, 2, 2, 1)
  b = np.array([-10, 50, 5, 5], np.int16).reshape(1, 2, 2, 1)
  cfg = cd.data_config(intensity='radfm')
  out = T.prepare_images([a, b], ['CT', 'CT'], (2, 2, 4), cfg)
  assert out.shape == (2, 3, 2, 2, 4) and out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, :, :, 0].ravel(), (np.array([0, 10, 20, 30]) + 10) / 60)
  np.testing.assert_allclose(out[1, 2, :, :, 3].ravel(), (np.array([-10, 50, 5, 5]) + 10) / 60)
  assert out.min() == 0.0 and out.max() == 1.0
  np.testing.assert_array_equal(out[:, 0], out[:, 1])                      # grey -> 3 channels
  # 8-bit images (PNG/JPEG) are divided by 255 like the original's ToTensor.
  rgb = np.array([[[[0]], [[51]]], [[[102]], [[255]]], [[[1]], [[2]]]], np.uint8)   # [3, 2, 1, 1]
  out = T.prepare_images([rgb], [''], (2, 1, 1), cfg)
  np.testing.assert_allclose(out[0, :, :, 0, 0], rgb[:, :, 0, 0] / 255.0, rtol=1e-6)


def test_8bit_2d_images_are_totensor_division_bit_for_bit():
  # torchvision's ToTensor: img.to(float32).div(255), correctly rounded; x * float32(1 / 255)
  # (the map `apply_map` applies) is 1 ulp off for 126 of the 256 values (3, 6, 7, 12, ...).
  values = np.arange(256, dtype=np.uint8)
  grey = values.reshape(1, 16, 16, 1)
  rgb = np.stack([values, values[::-1], np.roll(values, 7)]).reshape(3, 16, 16, 1)
  cfg = cd.data_config(intensity='radfm', resize_2d='nearest')
  out = T.prepare_images([grey, rgb], ['', ''], (16, 16, 4), cfg)
  expect = values.astype(np.float32) / np.float32(255)
  for c in range(3):
    np.testing.assert_array_equal(out[0, c, :, :, 2].ravel(), expect)
  np.testing.assert_array_equal(out[1, :, :, :, 3].reshape(3, 256),
                                rgb[..., 0].reshape(3, 256).astype(np.float32) / np.float32(255))
  three = np.float32(3)
  assert out[0, 0, 0, 3, 0] == three / np.float32(255) != three * np.float32(1 / 255)


def test_radfm_policy_min_max_scales_an_8bit_3d_scan():
  # The original's RadioVQA loads a .npy case and min-max scales it whatever its dtype; only its
  # 2D datasets' ToTensor divides 8-bit values by 255. A uint8 3D scan of 3..250 must therefore
  # span [0, 1] (x / 255 gave 3/255..250/255).
  vol = np.array([3, 50, 250, 100, 3, 7, 9, 11], np.uint8).reshape(1, 2, 2, 2)
  cfg = cd.data_config(intensity='radfm')
  out = T.prepare_images([vol], [''], (2, 2, 2), cfg)
  np.testing.assert_allclose(out[0, 0].ravel(), (vol.ravel() - 3.0) / 247.0, rtol=1e-6)
  # an 8-bit 2D image next to it: not every image is 2D, so min-max over both together
  img = np.array([0, 51, 102, 200], np.uint8).reshape(1, 2, 2, 1)
  out = T.prepare_images([vol, img], ['', ''], (2, 2, 2), cfg)
  np.testing.assert_allclose(out[1, 0, :, :, 0].ravel(), img.ravel() / 250.0, rtol=1e-6)


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('dtype', ['int16', 'uint8', 'float32'])
def test_radfm_min_max_is_the_originals_division_bit_for_bit(dtype, seed):
  """`radfm` min-max of a 3D case equals the original's (x - min) / (max - min) (a NumPy
  transcription: conftest_data.original_min_max) bit for bit, for int16, uint8 and float32
  scans. The product by the float32 reciprocal it once was differs by 1 ulp on some voxels of
  every one of these cases, so the test tells the two apart."""
  case = cd.random_cases(seed)[dtype]
  cfg = cd.data_config(intensity='radfm')
  out = T.prepare_images(case, [''] * len(case), (12, 10, 8), cfg)
  want = cd.original_min_max(case)
  lo, hi = min(float(x.min()) for x in case), max(float(x.max()) for x in case)
  reciprocal = np.float32(1.0 / (hi - lo))
  for s, (x, w) in enumerate(zip(case, want)):
    for c in range(3):
      np.testing.assert_array_equal(out[s, c], w[c if x.shape[0] == 3 else 0])
      assert out[s, c].tobytes() == w[c if x.shape[0] == 3 else 0].tobytes()   # no -0 for 0
  old = [(x.astype(np.float32) - np.float32(lo)) * reciprocal for x in case]
  assert not all(np.array_equal(o, w) for o, w in zip(old, want))
  assert out.min() == 0.0 and out.max() == 1.0


def test_ct_windows():
  hu = np.array([-1000, -160, 40, 240, 1000], np.int16).reshape(1, 5, 1, 1)
  cfg = cd.data_config(intensity='ct_window', ct_windows=((40.0, 400.0),))
  out = T.prepare_images([hu], ['CT'], (5, 1, 1), cfg)
  np.testing.assert_allclose(out[0, 0, :, 0, 0], [0, 0, 0.5, 1, 1])
  np.testing.assert_array_equal(out[0, 0], out[0, 2])
  cfg3 = cd.data_config(intensity='ct_windows3',
                        ct_windows=((40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0)))
  out = T.prepare_images([hu], ['CT'], (5, 1, 1), cfg3)
  np.testing.assert_allclose(out[0, 1, :, 0, 0], np.clip((hu.ravel() + 1350) / 1500, 0, 1),
                             rtol=1e-6)
  np.testing.assert_allclose(out[0, 2, :, 0, 0], np.clip((hu.ravel() + 500) / 1800, 0, 1),
                             rtol=1e-6)
  mr = np.array([2, 4, 6, 8, 10], np.int16).reshape(1, 5, 1, 1)           # non-CT: min-max
  out = T.prepare_images([mr], ['MR'], (5, 1, 1), cfg3)
  np.testing.assert_allclose(out[0, 0, :, 0, 0], [0, 0.25, 0.5, 0.75, 1])


def test_percentile_clipping():
  x = np.arange(101, dtype=np.float32).reshape(1, 101, 1, 1)
  cfg = cd.data_config(intensity='percentile', percentiles=(10.0, 90.0))
  out = T.prepare_images([x], [''], (101, 1, 1), cfg)[0, 0, :, 0, 0]
  np.testing.assert_allclose(out[[0, 10, 50, 90, 100]], [0, 0, 0.5, 1, 1], atol=1e-6)


def test_trilinear_mode_end_to_end():
  x = np.linspace(0, 1, 8, dtype=np.float32).reshape(1, 8, 1, 1) * np.ones((1, 8, 2, 2), np.float32)
  out = T.prepare_images([x], [''], (4, 2, 2), cd.data_config(resize='trilinear'))
  # half-pixel linear 8 -> 4 averages neighbour pairs
  np.testing.assert_allclose(out[0, 0, :, 0, 0], [(0 + 1) / 14, (2 + 3) / 14, (4 + 5) / 14,
                                                  (6 + 7) / 14], atol=1e-6)


def test_config_validates_the_intensity_fields():
  from radfm_jax.config import ConfigError, load_config
  cfg = load_config('configs/radfm.py:model=tiny')
  assert cfg.data.ct_windows[0] == (40.0, 400.0) and cfg.data.percentiles == (0.5, 99.5)
  with pytest.raises(ConfigError, match='data.percentiles'):
    load_config('configs/radfm.py:model=tiny', ['data.percentiles=[90.0, 10.0]'])
  with pytest.raises(ConfigError, match='data.ct_windows'):
    load_config('configs/radfm.py:model=tiny', ['data.intensity=ct_windows3',
                                                'data.ct_windows=[[40.0, 400.0]]'])


# ------------------------------------------------------------------------------------------------
# 2D images as the original loads them: crop box, then Pillow bicubic (data.resize_2d='bicubic')


def _pil_resized_crop(hwc: np.ndarray, box, size: int) -> np.ndarray:
  """What torchvision's `resized_crop` does to the original's PIL RGB image: crop, then resize
  with the bicubic filter (the reference `bicubic_2d` must equal)."""
  from PIL import Image
  top, left, h, w = box
  img = Image.fromarray(hwc).crop((left, top, left + w, top + h))
  return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def test_bicubic_2d_is_pillows_rgb_resized_crop():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))[..., None]
  for box in [(3, 5, 30, 40), (0, 0, 37, 53), (10, 20, 27, 33)]:
    out = T.bicubic_2d(chw, 32, box)
    assert out.dtype == np.uint8 and out.shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(out[..., 0].transpose(1, 2, 0), _pil_resized_crop(rgb, box, 32))
  grey = rgb[..., :1].copy()                        # one grey channel: the RGB image's channel
  out = T.bicubic_2d(np.ascontiguousarray(grey.transpose(2, 0, 1))[..., None], 32, (3, 5, 30, 40))
  np.testing.assert_array_equal(
      out[0, :, :, 0], _pil_resized_crop(np.repeat(grey, 3, axis=2), (3, 5, 30, 40), 32)[..., 0])
  # 16-bit: resized in float32 (no 8-bit rounding, no narrowing); a constant stays constant
  deep = np.full((1, 20, 24, 1), 40000, np.uint16)
  out = T.bicubic_2d(deep, 16)
  assert out.dtype == np.float32 and np.all(out == 40000.0)
  # the whole image at the target size is the image itself
  same = rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
  assert T.bicubic_2d(same, 32) is same


def test_random_crop_box_draws_torchvisions_distribution():
  rng = np.random.default_rng(1)
  h, w = 300, 400
  boxes = [T.random_crop_box(h, w, rng) for _ in range(500)]
  for top, left, bh, bw in boxes:
    assert 0 <= top <= h - bh and 0 <= left <= w - bw
    assert 0.8 * h * w - (bh + bw) <= bh * bw <= h * w            # area share 0.8-1.0 (+ rounding)
    assert 0.75 - 0.01 <= bw / bh <= 4 / 3 + 0.01                  # aspect 3/4-4/3 (+ rounding)
  assert len(set(boxes)) > 400                                     # drawn, not fixed
  again = np.random.default_rng(1)
  assert [T.random_crop_box(h, w, again) for _ in range(500)] == boxes
  # no aspect in range fits a 1 x 100 strip in ten tries: torchvision's centre-crop fallback
  assert T.random_crop_box(1, 100, np.random.default_rng(2)) == (0, 49, 1, 1)


class _Draws:
  """A stand-in rng: uniform(a, b) = a + (b - a) * u for the given u; integers(lo, hi) = the
  middle of [lo, hi)."""

  def __init__(self, us):
    self.us = list(us)

  def uniform(self, a, b):
    return a + (b - a) * self.us.pop(0)

  def integers(self, lo, hi):
    return lo + (hi - lo) // 2


def test_random_crop_box_is_torchvisions_get_params_for_the_same_draws():
  # Golden boxes from torchvision 0.28 `RandomResizedCrop.get_params(img, (0.8, 1), (3/4, 4/3))`
  # with torch.empty(1).uniform_(a, b) patched to give float32(a + (b - a) * u) for these u and
  # torch.randint(lo, hi) the middle of [lo, hi). torch works in float32 there: with float64 the
  # first box was 1 pixel narrower (2210) and the second 1 pixel taller (2083).
  cases = [((2048, 2500), (0.18180933594703674, 0.7293798327445984), (56, 145, 1937, 2211)),
           ((2500, 2500), (0.1214803010225296, 0.7993195056915283), (209, 13, 2082, 2474))]
  for (h, w), us, box in cases:
    assert T.random_crop_box(h, w, _Draws(us)) == box


def test_prepare_2d_touches_only_2d_images_and_follows_the_switch():
  rng = np.random.default_rng(3)
  img2d = rng.integers(0, 256, (3, 40, 50, 1), dtype=np.uint8)
  vol = rng.integers(0, 1000, (1, 40, 50, 6)).astype(np.int16)
  bicubic = cd.data_config(resize_2d='bicubic')
  out2d, outvol = T.prepare_2d([img2d, vol], bicubic)
  np.testing.assert_array_equal(out2d, T.bicubic_2d(img2d, 32))
  assert outvol is vol
  first = T.prepare_2d([img2d], bicubic, np.random.default_rng(7))[0]
  np.testing.assert_array_equal(
      first, T.bicubic_2d(img2d, 32, T.random_crop_box(40, 50, np.random.default_rng(7))))
  assert T.prepare_2d([img2d], cd.data_config(resize_2d='nearest'))[0] is img2d
  # the model input of the whole pipeline step: bicubic 32 x 32, then the depth bucket (4 slices)
  out = T.prepare_images([img2d], [''], (32, 32, 4), bicubic)
  np.testing.assert_array_equal(out[0, :, :, :, 0],
                                T.bicubic_2d(img2d, 32)[..., 0] / np.float32(255))
  assert np.all(out[0] == out[0, :, :, :, :1])
