"""Intensity policies, RadFM shape buckets and resizing for stored scans.

Arrays here are [C, H, W, D] (the VolumeStore layout, C in {1, 3}); a prepared sample is
[S, 3, H, W, D] float32 in [0, 1].

Intensity policies (`DataConfig.intensity`):
  * `radfm`       the original: min-max over **all images of the sample together** (docs/original.md
                  section 11.1), grey copied to 3 channels. One exception keeps 2D parity: if every
                  image of the sample is an 8-bit 2D image (PNG/JPEG, depth 1), the original's
                  `ToTensor` divided by 255 instead, so that is done here too (the same float32
                  division, bit for bit: the map (x - 0) / 255). An 8-bit 3D scan
                  (a uint8 RadFM .npy case) is min-max scaled, as the original's 3D datasets do.

2D images. An image of depth 1 is a 2D image (bicubic resize and crop: `prepare_2d`; `ToTensor`
above) unless it is `stacked`: an image of a RadFM case stack (a 5D .npy [S, C, H, W, D], marked
by its scan attributes: store.case_image). The original's 3D datasets (RadioVQA, RadioCaption,
Radiofeatures) read such a case as a volume whatever its depth, and its conversion of a case that
has only JPEG images gives depth 1; so a stacked image is always prepared as a volume (no crop, no
bicubic step, min-max). The functions below take `stacked` (one bool per image; None: none is).
  * `ct_window`   CT images: clip to one HU window `ct_windows[0]` = (level, width), scale to
                  [0, 1], replicate to 3 channels.
  * `ct_windows3` CT images: the first three `ct_windows` as the R, G, B channels.
  * `percentile`  per image: clip to the `percentiles` (low, high) of its values, scale to [0, 1].
                  When the two are equal (a sparse scan: 99.9% background and a small lesion) the
                  channel takes its min-max instead, so the lesion is kept rather than the image
                  becoming all zeros (`channel_maps`).
  For the CT policies, images whose modality is not CT fall back to per-image min-max.

Statistics (min, max, percentiles) come from the full-resolution scan; the affine map to [0, 1]
is applied after resizing, which is exact for `nearest` (a gather commutes with any pointwise
map) and for min-max with trilinear (an affine map commutes with interpolation).

The map is the original's arithmetic, `(image - image.min()) / (image.max() - image.min())`, in
float32: the voxel minus low, then divided by (high - low), that difference itself taken in
float32 (`map_coefficients`). For a float32 scan these are the original's own float32 operations;
for an integer scan the original divides in float64 and casts to float32, which gives the same
float32 (the differences are exact in float32 and a float64 quotient rounded to float32 is the
correctly rounded float32 quotient: 53 >= 2 * 24 + 2). A product by the reciprocal 1 / (high -
low) is 1 ulp off for some voxels, so neither the host nor the device uses one.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

POLICIES = ('radfm', 'ct_window', 'ct_windows3', 'percentile')


# ------------------------------------------------------------------------------------------------
# Shape buckets (docs/original.md sections 11.2, 11.3)


def depth_bucket(depth: int, buckets: Sequence[int]) -> int:
  """The RadFM depth bucket: nearest bucket to max(buckets[0], depth); ties to the smaller one.

  A bucket only wins when it is strictly closer than every earlier one, so 6 -> 4 (tie between 4
  and 8) and anything above the largest bucket maps to the largest.
  """
  depth = max(buckets[0], depth)
  best = buckets[0]
  for b in buckets[1:]:
    if abs(b - depth) < abs(best - depth):
      best = b
  return best


def sample_shape(depths: Sequence[int], data_cfg, batch_size: int) -> tuple[int, int, int]:
  """Target (H, W, D) for a sample whose images have `depths`, batched `batch_size` per step.

  As the original collator: a batch of one sample with more than 6 images uses depths <= 32, and
  a batch of one sample whose depth bucket is above the smallest goes to the reduced
  `image_size_3d_single` (256 in RadFM) in-plane size; everything else is `image_size_2d`.
  """
  buckets = list(data_cfg.depth_buckets)
  if batch_size == 1 and len(depths) > 6:
    buckets = [b for b in buckets if b <= 32] or buckets[:1]
  d = depth_bucket(max(depths) if depths else 1, buckets)
  size = (data_cfg.image_size_3d_single if batch_size == 1 and d > buckets[0]
          else data_cfg.image_size_2d)
  return size, size, d


def stack_depth(depths: Sequence[int], data_cfg) -> int:
  """The depth the original's dataset stacks a sample to (`stack_images`, docs/original.md section
  11.2): the bucket of its deepest image among all of `data_cfg.depth_buckets`. Its training
  collator then resizes that stack once more to the batch's bucket (`sample_shape`), which differs
  only for a batch of one sample with more than 6 images (buckets <= 32): `depth_indices`."""
  return depth_bucket(max(depths) if len(depths) else 1, list(data_cfg.depth_buckets))


# ------------------------------------------------------------------------------------------------
# Resizing


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch legacy `nearest` source indices: floor(dst * (in / out)) in float32, clamped.

  The scale is computed in float32 exactly as ATen's CPU kernel does, so indices match it
  bit for bit (10 -> 4 picks 0, 2, 5, 7; `jax.image.resize` would pick 1, 3, 6, 8).
  """
  if n_in == n_out:
    return np.arange(n_out)
  if n_out == 2 * n_in:
    return np.arange(n_out) >> 1
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


def depth_indices(n_in: int, n_out: int, stacked_depth: int | None = None) -> np.ndarray:
  """Source slices of a `nearest` resize of depth n_in to n_out, through the original's two
  resizes when `stacked_depth` (`stack_depth`) is given: its dataset's n_in -> stacked_depth, then
  its collator's stacked_depth -> n_out (legacy nearest twice: e.g. 50 -> 48 -> 32 takes slice 13
  where 50 -> 32 takes 14). The in-plane axes need no such step: the collator halves the stack's
  data.image_size_2d (512 -> 256), and floor(2i * in/512) = floor(i * in/256) in float32."""
  if stacked_depth is None or stacked_depth in (n_in, n_out):
    return nearest_indices(n_in, n_out)
  return nearest_indices(n_in, stacked_depth)[nearest_indices(stacked_depth, n_out)]


def _linear_weights(n_in: int, n_out: int):
  """Half-pixel (align_corners=False) linear interpolation: (i0, i1, w1) per output index."""
  scale = np.float32(n_in) / np.float32(n_out)
  src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize(x: np.ndarray, shape: Sequence[int], mode: str = 'nearest',
           stacked_depth: int | None = None) -> np.ndarray:
  """[C, H, W, D] -> [C, *shape]; `nearest` keeps the dtype, `trilinear` returns float32.

  `trilinear` is separable linear interpolation with half-pixel centres and no antialiasing,
  i.e. `F.interpolate(mode='trilinear', align_corners=False)`. `stacked_depth`: the sample's
  `stack_depth`, for `nearest`'s depth axis (`depth_indices`).
  """
  shape = tuple(int(s) for s in shape)
  if x.shape[1:] == shape and (mode != 'nearest' or stacked_depth in (None, shape[2])):
    return x
  if mode == 'nearest':
    (h, w, d), (oh, ow, od) = x.shape[1:], shape
    idx = [np.arange(x.shape[0]), nearest_indices(h, oh), nearest_indices(w, ow),
           depth_indices(d, od, stacked_depth)]
    return x[np.ix_(*idx)]
  if mode != 'trilinear':
    raise ValueError(f"resize mode {mode!r}: expected 'nearest' or 'trilinear'")
  out = x.astype(np.float32, copy=False)
  for axis, n_out in zip((1, 2, 3), shape):
    n_in = out.shape[axis]
    if n_in == n_out:
      continue
    i0, i1, w1 = _linear_weights(n_in, n_out)
    bshape = [1, 1, 1, 1]
    bshape[axis] = n_out
    w1 = w1.reshape(bshape)
    a, b = np.take(out, i0, axis=axis), np.take(out, i1, axis=axis)
    out = a + (b - a) * w1
  return out


# ------------------------------------------------------------------------------------------------
# 2D images as the original loads them (data.resize_2d='bicubic', data.random_crop_2d)

# torchvision's RandomResizedCrop defaults as the original sets them: area share, aspect range.
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_crop_box(height: int, width: int, rng: np.random.Generator,
                    scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a crop drawn as torchvision's `RandomResizedCrop.get_params`: ten tries
  of an area share in `scale` and a log-uniform aspect in `ratio`, then the centre crop of the
  clamped aspect. The same distribution; the draws come from `rng`, not torch's generator.
  The area share, log-aspect and aspect are float32 as torch's are (`torch.empty(1).uniform_`,
  `torch.log(torch.tensor(ratio))`, `torch.exp`), so the same draws give the same box: in
  float64 a size could round to the next pixel (e.g. a 2048 x 2500 image)."""
  area = height * width
  log_ratio = [float(v) for v in np.log(np.asarray(ratio, np.float32))]
  for _ in range(10):
    target = area * float(np.float32(rng.uniform(scale[0], scale[1])))
    aspect = float(np.exp(np.float32(rng.uniform(log_ratio[0], log_ratio[1]))))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def bicubic_2d(x: np.ndarray, size: int, box: tuple[int, int, int, int] | None = None
               ) -> np.ndarray:
  """A 2D image [C, h, w, 1] -> [C, size, size, 1]: the `box` (top, left, h, w; None = the whole
  image) cut out, then resized with Pillow's bicubic filter, channel by channel, as torchvision's
  `resized_crop` does to the original's PIL image. uint8 stays uint8 (Pillow rounds and clips,
  as the original's 8-bit RGB image did); any other dtype is resized as float32 (mode 'F')."""
  from PIL import Image
  c, h, w, d = x.shape
  if d != 1:
    raise ValueError(f'bicubic_2d takes a 2D image [C, h, w, 1], got {list(x.shape)}')
  top, left, bh, bw = box if box is not None else (0, 0, h, w)
  if (top, left, bh, bw) == (0, 0, h, w) and h == w == size:
    return x
  dtype = np.uint8 if x.dtype == np.uint8 else np.float32
  out = np.empty((c, size, size, 1), dtype)
  for k in range(c):
    plane = Image.fromarray(np.ascontiguousarray(x[k, :, :, 0], dtype), 'L' if dtype == np.uint8
                            else 'F')
    plane = plane.crop((left, top, left + bw, top + bh))
    out[k, :, :, 0] = np.asarray(plane.resize((size, size), Image.Resampling.BICUBIC))
  return out


def _stacked(images: Sequence, stacked: Sequence[bool] | None) -> list[bool]:
  """`stacked` as one bool per image (None: no image is stacked)."""
  if stacked is None:
    return [False] * len(images)
  if len(stacked) != len(images):
    raise ValueError(f'{len(stacked)} stacked flags for {len(images)} images')
  return [bool(v) for v in stacked]


def is_2d(x: np.ndarray, stacked: bool = False) -> bool:
  """Whether image x [C, h, w, d] is prepared as a 2D image: depth 1 and not `stacked` (an image
  of a RadFM case stack is a volume whatever its depth: module docstring)."""
  return x.ndim == 4 and x.shape[3] == 1 and not stacked


def prepare_2d(images: Sequence[np.ndarray], data_cfg,
               rng: np.random.Generator | None = None,
               stacked: Sequence[bool] | None = None) -> list[np.ndarray]:
  """The sample's 2D images (`is_2d`) through `bicubic_2d` to `data_cfg.image_size_2d` when
  `data_cfg.resize_2d` is 'bicubic' (3D scans and stacked images unchanged): each in a box drawn
  by `random_crop_box` from `rng` (training with `data.random_crop_2d`), else whole."""
  if getattr(data_cfg, 'resize_2d', 'nearest') != 'bicubic':
    return list(images)
  size = int(data_cfg.image_size_2d)
  out = []
  for x, stack in zip(images, _stacked(images, stacked)):
    if x is not None and is_2d(x, stack):
      box = random_crop_box(x.shape[1], x.shape[2], rng) if rng is not None else None
      x = bicubic_2d(x, size, box)
    out.append(x)
  return out


def resized_2d_dtype(dtype, data_cfg, stacked: bool = False) -> np.dtype:
  """The dtype `prepare_2d` gives a depth-1 image stored as `dtype` (for a bucket's host carrier;
  a `stacked` one keeps its dtype: it is a volume)."""
  if (getattr(data_cfg, 'resize_2d', 'nearest') != 'bicubic' or np.dtype(dtype) == np.uint8
      or stacked):
    return np.dtype(dtype)
  return np.dtype(np.float32)


# ------------------------------------------------------------------------------------------------
# Intensity


def _is_ct(modality: str) -> bool:
  # case and surrounding spaces aside ('CT ' from a hand-written manifest or a generate() call)
  return str(modality or '').strip().upper() == 'CT'


def _subsample(x: np.ndarray, limit: int = 1 << 20) -> np.ndarray:
  """A deterministic strided subset (percentiles of 1M voxels are within noise of the full set)."""
  flat = x.reshape(-1)
  step = max(1, flat.size // limit)
  return flat[::step]


def value_range(x: np.ndarray) -> tuple[float, float]:
  """(min, max) of a scan as Python floats (exact for every stored dtype): the statistics of the
  min-max policies, also kept with a training-resolution copy (data/train_copies.py)."""
  return float(x.min()), float(x.max())


def takes_range(x: np.ndarray, modality: str, data_cfg, stacked: bool = False) -> bool:
  """Whether the intensity policy scales image x [C, h, w, d] (as read, full resolution) by its
  `value_range`, so that a range found by the reader (`channel_maps`: `ranges`) stands for the
  one the policy would compute: `radfm` (ToTensor samples aside: 8-bit, never given one) and the
  CT policies' non-CT images; not `percentile` (percentiles), a CT image under a CT policy (its
  window) or a 2D image that `prepare_2d` resizes first (the policy takes the resized range)."""
  policy = data_cfg.intensity
  if policy == 'percentile' or (policy in ('ct_window', 'ct_windows3') and _is_ct(modality)):
    return False
  return not (getattr(data_cfg, 'resize_2d', 'nearest') == 'bicubic' and is_2d(x, stacked))


def to_tensor_sample(images: Sequence[np.ndarray], stacked: Sequence[bool] | None = None) -> bool:
  """Whether the `radfm` policy scales a sample as the original's `ToTensor` (x / 255): every
  image an 8-bit 2D image (`is_2d`). Only 2D images: the original's 3D datasets (RadioVQA & co.)
  min-max scale every case, a uint8 one too, and a depth-1 one (`stacked`)."""
  return bool(images) and all(x.dtype == np.uint8 and is_2d(x, s)
                              for x, s in zip(images, _stacked(images, stacked)))


def channel_maps(images: Sequence[np.ndarray], modalities: Sequence[str], policy: str,
                 ct_windows=((40.0, 400.0),), percentiles=(0.5, 99.5), ranges=None,
                 stacked: Sequence[bool] | None = None):
  """Per image, the 3 output channels as (source channel, low, high, clip).

  output channel = (x[source] - low) / (high - low), clipped to [0, 1] when `clip`.
  `ranges` (one (min, max) or None per image): the full-resolution scan's `value_range` for an
  image given already resized (a training-resolution copy, whose own min / max can differ);
  None: computed from the image. The `percentile` policy takes none (it needs the full scan).
  `stacked`: images of a case stack (module docstring), never scaled as `ToTensor`.
  """
  if policy not in POLICIES:
    raise ValueError(f'intensity policy {policy!r}: expected one of {POLICIES}')
  ranges = list(ranges) if ranges is not None else [None] * len(images)
  if policy == 'percentile' and any(r is not None for r in ranges):
    raise ValueError('the percentile policy needs the full-resolution scans, not value ranges')

  def gray_or_rgb(x, lo, hi, clip):
    return [(c if x.shape[0] == 3 else 0, lo, hi, clip) for c in range(3)]

  def minmax(x, r):
    return gray_or_rgb(x, *(r if r is not None else value_range(x)), False)

  maps = []
  if policy == 'radfm':
    if to_tensor_sample(images, stacked):
      lo, hi = 0.0, 255.0
    elif images:
      found = [r if r is not None else value_range(x) for x, r in zip(images, ranges)]
      lo, hi = min(r[0] for r in found), max(r[1] for r in found)
    for x in images:
      maps.append(gray_or_rgb(x, lo, hi, False))
    return maps
  for x, modality, r in zip(images, modalities, ranges):
    if policy in ('ct_window', 'ct_windows3') and _is_ct(modality):
      windows = [ct_windows[0]] * 3 if policy == 'ct_window' else list(ct_windows[:3])
      if len(windows) < 3:
        raise ValueError(f'ct_windows3 needs three (level, width) windows, got {ct_windows}')
      maps.append([(0, lv - w / 2, lv + w / 2, True) for lv, w in windows])
    elif policy == 'percentile':
      chans = []
      for c in range(3):
        src = c if x.shape[0] == 3 else 0
        lo, hi = (float(v) for v in np.percentile(_subsample(x[src]), percentiles))
        if not hi > lo:
          # An empty percentile range (more than `high`% of the voxels share one value) would map
          # every voxel to 0 (map_coefficients: scale 0), dropping the rare ones that differ: the
          # channel's min-max keeps them, from the full scan (the subsample may miss them). Still
          # a map, so the host and the device (data.host_dtype='stored') apply the same numbers.
          lo, hi = value_range(x[src])
        chans.append((src, lo, hi, True))
      maps.append(chans)
    else:
      maps.append(minmax(x, r))
  return maps


def map_coefficients(chan_map) -> list[tuple[int, np.float32, np.float32, bool]]:
  """A channel map (`channel_maps`) as the float32 numbers applied: (source, low, range, clip)
  per output channel, output = (float32(x[source]) - low) / range (then clipped to [0, 1]),
  range = float32(high) - float32(low) in float32 (the original's `image.max() - image.min()`
  on a float32 scan; exact for integer ones). An empty range (high <= low: a constant sample, or
  a zero map of an empty slot) is 0 and maps every voxel to 0, where the division would give NaN.
  The host (`apply_map`) and the device (data/batch.py: `device_inputs`) both use these."""
  out = []
  for src, lo, hi, clip in chan_map:
    width = np.float32(hi) - np.float32(lo)
    out.append((int(src), np.float32(lo), width if width > 0 else np.float32(0.0), bool(clip)))
  return out


def apply_map(x: np.ndarray, chan_map, out: np.ndarray):
  """Writes the 3 mapped channels of x [C, H, W, D] into out [3, H, W, D] (float32): a float32
  subtraction, then a float32 division (`map_coefficients`; module docstring: not a product by
  the reciprocal, which is 1 ulp off the original for some voxels)."""
  cache = {}
  for c, (src, lo, width, clip) in enumerate(map_coefficients(chan_map)):
    key = (src, lo, width, clip)
    if key in cache:                         # grey -> RGB: compute once, copy twice
      out[c] = out[cache[key]]
      continue
    cache[key] = c
    if not width > 0:
      out[c] = 0.0
      continue
    np.subtract(x[src], lo, out=out[c], dtype=np.float32, casting='unsafe')
    np.divide(out[c], width, out=out[c])
    if clip:
      np.clip(out[c], 0.0, 1.0, out=out[c])


def _policy_maps(images, modalities, data_cfg, ranges, stacked):
  return channel_maps(images, modalities, data_cfg.intensity,
                      getattr(data_cfg, 'ct_windows', ((40.0, 400.0),)),
                      getattr(data_cfg, 'percentiles', (0.5, 99.5)), ranges, stacked)


def prepare_images(images: Sequence[np.ndarray], modalities: Sequence[str],
                   shape: Sequence[int], data_cfg, out: np.ndarray | None = None,
                   ranges=None, crop_rng: np.random.Generator | None = None,
                   stacked: Sequence[bool] | None = None,
                   stacked_depth: int | None = None) -> np.ndarray:
  """Raw scans [C, h, w, d] (one per image) -> [S, 3, H, W, D] float32 in [0, 1].

  `out` (if given) is a preallocated [>=S, 3, H, W, D] buffer filled in place, so the collator
  writes each image straight into the batch. `ranges`: see `channel_maps`. 2D images first go
  through `prepare_2d` (`crop_rng`: the training crop's draws; None: the whole image);
  `stacked` images (of a case stack, module docstring) are volumes whatever their depth.
  `stacked_depth`: the original's per-sample stack depth (`stack_depth`; None: that of `images`,
  which holds when they are the full scans), the depth resize's intermediate step; an image given
  already resized (a training-resolution copy) must come at that depth.
  """
  images = prepare_2d(images, data_cfg, crop_rng, stacked)
  if stacked_depth is None:
    stacked_depth = stack_depth([x.shape[3] for x in images], data_cfg)
  h, w, d = (int(v) for v in shape)
  if out is None:
    out = np.zeros((len(images), 3, h, w, d), np.float32)
  # An all-8-bit-2D sample maps (x - 0) / 255: ToTensor's float32 x / 255 bit for bit.
  maps = _policy_maps(images, modalities, data_cfg, ranges, stacked)
  for s, (x, chan_map) in enumerate(zip(images, maps)):
    apply_map(resize(x, (h, w, d), data_cfg.resize, stacked_depth), chan_map, out[s])
  return out


# ------------------------------------------------------------------------------------------------
# Stored-dtype host batches (data.host_dtype='stored')


def carrier_dtype(dtypes: Sequence[str], resize_mode: str = 'nearest') -> np.dtype:
  """The smallest dtype holding every stored dtype in `dtypes` exactly, as the host carries the
  resized voxels: uint8, int16, else float32 (also for `trilinear`, whose output is float32).
  float32 is exact for any source: the host path casts to float32 before mapping too."""
  names = {np.dtype(d).name for d in dtypes}
  if resize_mode != 'nearest':
    return np.dtype(np.float32)
  if names <= {'uint8'}:
    return np.dtype(np.uint8)
  if names <= {'uint8', 'int8', 'int16'}:
    return np.dtype(np.int16)
  return np.dtype(np.float32)


def prepare_stored(images: Sequence[np.ndarray], modalities: Sequence[str],
                   shape: Sequence[int], data_cfg, out: np.ndarray, maps: np.ndarray,
                   ranges=None, crop_rng: np.random.Generator | None = None,
                   stacked: Sequence[bool] | None = None, stacked_depth: int | None = None):
  """Raw scans [C, h, w, d] -> the resized voxels in `out` [>=S, C', H, W, D] (the carrier
  dtype, C' >= every C) and the intensity maps in `maps` [>=S, 3, 4] float32 (source, low,
  range, clip per output channel, `map_coefficients`): `prepare_images` without the mapping,
  which the device applies (data/batch.py: `device_inputs`). `ranges`, `crop_rng`, `stacked`,
  `stacked_depth`: see `prepare_images`."""
  images = prepare_2d(images, data_cfg, crop_rng, stacked)
  if stacked_depth is None:
    stacked_depth = stack_depth([x.shape[3] for x in images], data_cfg)
  if any(x.dtype.kind == 'f' for x in images) and out.dtype.kind != 'f':
    raise ValueError(f'carrier {out.dtype} cannot hold the float32 voxels of a resized 2D image '
                     '(transforms.resized_2d_dtype)')
  chan_maps = _policy_maps(images, modalities, data_cfg, ranges, stacked)
  for s, (x, chan_map) in enumerate(zip(images, chan_maps)):
    x = resize(x, tuple(int(v) for v in shape), data_cfg.resize, stacked_depth)
    out[s, :x.shape[0]] = x
    maps[s] = map_coefficients(chan_map)
