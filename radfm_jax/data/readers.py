"""Scan readers: a file (NIfTI, DICOM file or series folder, PNG/JPEG, .npy) -> validated arrays
[C, H, W, D] in their storable dtype plus attributes. Used by `ingest` and, for raw files, by
`generate` / `eval`, so every guard below protects all of them.

    [(array, attrs)] = read_scan('ct.nii.gz', {'modality': 'CT'})   # RejectedScan otherwise
    array, attrs = read_one('case.npy', {'index': 1})   # generate: one image per <image>

Bounded memory from headers. Before any voxel is read, the bytes the header claims (NIfTI
dim/datatype, DICOM Rows x Columns x frames x samples x bits, PNG/JPEG size x bands, .npy header)
are checked: an uncompressed file must hold them, a .nii.gz / PNG cannot claim more than DEFLATE
can expand (1032x its size), and no scan may need more than `max_bytes` (default 2 GiB, `ingest
--max-scan-bytes`). A 1 KB file claiming 1.6 GB is a reject naming the file; nothing large is
allocated.

Reading rules (stored layout [C, H, W, D], see store.py):
  * NIfTI: reoriented to RAS with `nib.as_closest_canonical`; 4D: trailing singleton axes are
    squeezed, a real time/echo axis needs `frame`, otherwise the scan is rejected (no silent
    averaging or first-frame pick). Rank > 4 after squeezing is rejected. Spacing is the column
    norms of the RAS affine. A non-finite or singular affine is a reject. A zero or negative
    pixdim, which nibabel replaces on load (0 by 1, a negative by its absolute value) when the
    geometry comes from pixdim (no sform), is a recorded repair: attribute `spacing_repaired`
    (the header's values as text) and a line in STORE/warnings.jsonl.
  * DICOM: a file or a folder holding one series; slices are sorted by position along the slice
    normal (ImagePositionPatient), else InstanceNumber; RescaleSlope/Intercept applied (int16
    when the result is integral and fits, e.g. CT HU, else float32 when it fits); volumes with
    orientation tags are reoriented LPS -> RAS like NIfTI; a file without them (X-ray) is a 2D
    image. Zero / negative / NaN PixelSpacing, or two slices at one position: reject.
  * PNG/JPEG: Pillow; grayscale stays 1 channel (16-bit kept), everything else becomes RGB.
  * .npy: [H, W] / [H, W, D] / [C, H, W, D] (C in 1, 3) / [S, C, H, W, D]; other ranks rejected;
    never unpickled.
  * `frame` (which volume of a 4D NIfTI) and `index` (which image of a 5D .npy stack) pick along
    an axis; a scan without that axis is one frame / one image, so only 0 names it there. Any
    other value is a reject naming the field (`_check_pick`), never ignored.
A scan is rejected (RejectedScan, an InputError: `path: reason`) when it cannot be read, has a
wrong rank, is empty, holds any NaN/inf voxel (no repair: a NaN has no right value), is
constant, holds values its stored dtype cannot hold (int64 beyond int32, float64 beyond float32:
no wrap, no inf), or has spacing that is not finite and positive.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib

import numpy as np

from radfm_jax.data.store import CASE_INDEX, to_storable
from radfm_jax.errors import InputError

DEFAULT_MAX_SCAN_BYTES = 2 << 30
# DEFLATE (gzip, PNG) cannot expand data more than ~1032x (a 258-byte match costs >= 2 bits), so a
# compressed file cannot hold more than this many times its size, whatever its header says.
_DEFLATE_MAX_RATIO = 1032


class RejectedScan(InputError):
  """An input that cannot become a stored scan. `reason` says why; `path` (set by `read_scan`)
  names the file, and the message is `path: reason`."""

  def __init__(self, reason: str, path: str | None = None):
    super().__init__(f'{path}: {reason}' if path else reason)
    self.reason, self.path = reason, path


# ------------------------------------------------------------------------------------------------
# Readers: path -> list of (array [C, H, W, D], attributes)


def _check_size(what: str, memory: int, max_bytes: int, payload: int | None = None,
                file_bytes: int | None = None, compressed_bytes: int | None = None):
  """Header sizes against the file, before anything is allocated. `payload`: the bytes the header
  says the file stores; `file_bytes`: what an uncompressed file holds for them; `compressed_bytes`:
  the size of a DEFLATE-compressed file; `memory`: what decoding allocates."""
  if payload is not None and file_bytes is not None and payload > file_bytes:
    raise RejectedScan(f'{what}: the header claims {payload:,} bytes of pixel data but the file '
                       f'holds {max(file_bytes, 0):,}; expected a complete file')
  if (payload is not None and compressed_bytes is not None
      and payload > compressed_bytes * _DEFLATE_MAX_RATIO + (1 << 16)):
    raise RejectedScan(f'{what}: the header claims {payload:,} bytes from {compressed_bytes:,} '
                       f'compressed bytes, more than DEFLATE can expand (x{_DEFLATE_MAX_RATIO}); '
                       'expected a header that matches the data')
  if memory > max_bytes:
    raise RejectedScan(f'{what}: needs {memory:,} bytes in memory, over the limit of '
                       f'{max_bytes:,} (max_scan_bytes / --max-scan-bytes); expected a smaller '
                       'scan or a higher limit')


def _validate(array: np.ndarray) -> np.ndarray:
  """Checked array in its storable dtype (store.to_storable), or RejectedScan."""
  if array.ndim != 4:
    raise RejectedScan(f'wrong rank: shape {array.shape}')
  array = checked_values(array)
  if array.min() == array.max():
    raise RejectedScan(f'constant volume (every value {array.flat[0]!r})')
  return array


def checked_values(array: np.ndarray) -> np.ndarray:
  """`array` in its storable dtype (store.to_storable: float64 within float32's range becomes
  float32, int64 within int32 int32, ...), or RejectedScan: empty, any NaN / inf, a dtype that is
  not real numbers (complex, object, strings), a value that does not fit. What a scan read by
  ingest and an array given to `generate` both pass."""
  if array.size == 0:
    raise RejectedScan(f'empty array: shape {array.shape}')
  if array.dtype.kind == 'f':
    finite = np.isfinite(array)
    if not finite.any():
      raise RejectedScan('all values are NaN/inf')
    if not finite.all():
      raise RejectedScan(f'{int((~finite).sum())} NaN/inf values; expected finite voxels')
  elif array.dtype.kind not in 'iub':
    raise RejectedScan(f'unsupported dtype {array.dtype}')
  try:
    return to_storable(array)
  except ValueError as e:
    raise RejectedScan(str(e)) from None


def _check_spacing(spacing) -> list[float]:
  values = [float(v) for v in spacing]
  if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
    raise RejectedScan(f'spacing {values} mm is not finite and positive; expected a header with '
                       'real voxel sizes')
  return values


def _nifti_pixdim_repair(path: str, img) -> list[str] | None:
  """The header's own pixdim[1:4] (as text) when nibabel repaired them on load (0 -> 1, negative
  -> absolute value) and the geometry comes from them (no sform); else None."""
  import nibabel as nib
  header = img.header
  if int(header['sform_code']) > 0:
    return None                      # the sform is the geometry; pixdim is not used
  with nib.openers.ImageOpener(path) as f:
    raw = type(header).from_fileobj(f, check=False)['pixdim'][1:4]
  ndim = min(3, len(img.shape))
  if all(float(v) > 0 for v in raw[:ndim]):
    return None
  return [repr(float(v)) for v in raw]


def _check_pick(field: str, value: int | None, count: int, holds: str):
  """`frame` / `index` of an image entry against the `count` frames / images the scan holds
  (`holds` says what they are). A scan without that axis holds one, which 0 names; any other
  value would pick nothing there, so it is a reject rather than ignored."""
  if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
    raise RejectedScan(f'field {field}: got {type(value).__name__} {value!r}; expected an '
                       f'integer ({holds})')
  if value is not None and not 0 <= value < count:
    allowed = 'no value or 0' if count == 1 else f'0..{count - 1}'
    raise RejectedScan(f'field {field}: got {value}; expected {allowed} ({holds})')


def read_nifti(path: str, frame: int | None = None,
               max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> tuple[np.ndarray, dict]:
  import nibabel as nib
  try:
    img = nib.load(path)             # the header only: voxels are read below, after the checks
  except Exception as e:  # nibabel raises many types for non-NIfTI content
    raise RejectedScan(f'not a readable NIfTI: {type(e).__name__}: {e}') from e
  shape = list(img.shape)
  while len(shape) > 3 and shape[-1] == 1:      # what is squeezed below
    shape.pop()
  if len(shape) == 4 and frame is None:
    raise RejectedScan(f'4D volume with {shape[3]} frames; set "frame" to pick one')
  if len(shape) <= 4:                            # a larger rank is rejected below
    _check_pick('frame', frame, shape[3] if len(shape) == 4 else 1,
                f'the 4D volume has {shape[3]} frames' if len(shape) == 4 else
                f'NIfTI shape {list(img.shape)} is one volume; frame picks one of a 4D NIfTI')
  dtype = np.dtype(img.get_data_dtype())
  voxels = math.prod(int(n) for n in img.shape)
  scaled = not (img.dataobj.slope == 1 and img.dataobj.inter == 0)
  size = os.path.getsize(path)
  what = f'NIfTI shape {list(img.shape)} {dtype}'
  memory = voxels * (8 if scaled else dtype.itemsize)
  if path.lower().endswith('.gz'):
    _check_size(what, memory, max_bytes, voxels * dtype.itemsize, compressed_bytes=size)
  else:
    _check_size(what, memory, max_bytes, voxels * dtype.itemsize,
                file_bytes=size - int(img.dataobj.offset))
  if not np.isfinite(img.affine).all():
    raise RejectedScan(f'affine {img.affine[:3].tolist()} is not finite (NaN pixdim or '
                       'sform/qform); expected real voxel geometry')
  repaired = _nifti_pixdim_repair(path, img)
  if path.lower().endswith('.gz'):
    img = _whole_gzip(path, img, int(img.dataobj.offset) + voxels * dtype.itemsize)
  source_axcodes = ''.join(str(c) for c in nib.orientations.aff2axcodes(img.affine))
  try:
    img = nib.as_closest_canonical(img)
  except Exception as e:  # a singular affine cannot be reoriented
    raise RejectedScan(f'affine cannot be reoriented to RAS ({type(e).__name__}: {e}); '
                       'expected an invertible sform/qform') from e
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # truncated gzip: EOFError / zlib.error; short file: OSError
    raise RejectedScan(f'cannot read voxel data: {type(e).__name__}: {e}') from e
  source_dtype = str(dtype)
  spacing = _check_spacing(np.linalg.norm(img.affine[:3, :3], axis=0))
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim == 4:                   # `frame` was checked against the header's shape above
    data = data[..., frame]
  if data.ndim == 2:
    data = data[:, :, None]
  if data.ndim != 3:
    raise RejectedScan(f'wrong rank: NIfTI data shape {data.shape}')
  attrs = {'spacing': spacing, 'orientation': 'RAS', 'source_orientation': source_axcodes,
           'source_dtype': source_dtype}
  if repaired is not None:
    attrs['spacing_repaired'] = repaired
  return data[None], attrs


def _whole_gzip(path: str, img, needed: int):
  """`img` (a .nii.gz's header, `needed` = its data offset + voxel bytes) read from the whole gzip
  stream: gzip's CRC-32 and length of each member are checked only at its end, which a reader
  stopping after the voxels never reaches, so a corrupted byte would be stored as wrong voxels."""
  try:
    with gzip.open(path, 'rb') as f:
      raw = f.read(needed)
      while f.read(1 << 24):           # to the end: the trailers are checked there
        pass
  except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
    raise RejectedScan(f'cannot read voxel data: {type(e).__name__}: {e}; expected an intact '
                       'gzip file (gzip -t tests one)') from e
  if len(raw) < needed:
    raise RejectedScan(f'the gzip stream holds {len(raw)} bytes; the header claims {needed} '
                       '(data offset + voxels)')
  return type(img).from_bytes(raw)


def _dicom_value(ds, field: str, default: float) -> float:
  """A numeric DICOM field (`default` when absent or empty), finite, else a RejectedScan."""
  raw = getattr(ds, field, None)
  try:
    value = default if raw is None or raw == '' else float(raw)
  except (TypeError, ValueError):
    value = math.nan
  if not math.isfinite(value):
    raise RejectedScan(f'{field} {raw}: expected a finite number')
  return value


def _rescale(ds, pixels: np.ndarray) -> np.ndarray:
  if ds.get('ModalityLUTSequence'):
    raise RejectedScan('a Modality LUT Sequence, which this reader does not apply; expected '
                       'RescaleSlope / RescaleIntercept (or none)')
  slope = _dicom_value(ds, 'RescaleSlope', 1.0)
  intercept = _dicom_value(ds, 'RescaleIntercept', 0.0)
  if slope == 0:
    raise RejectedScan('RescaleSlope 0 would make every value the intercept; expected a '
                       'non-zero slope')
  if slope == 1 and intercept == 0:
    return pixels
  out = pixels.astype(np.float64) * slope + intercept
  if slope == int(slope) and intercept == int(intercept):
    lo, hi = out.min(), out.max()
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
      return out.astype(np.int16)  # CT: integral HU fit int16 exactly
  try:
    return to_storable(out)        # float32 when every value fits, never inf
  except ValueError as e:
    raise RejectedScan(f'RescaleSlope {slope:g} / RescaleIntercept {intercept:g}: {e}') from None


def _dicom_pixel_bytes(ds, name: str, max_bytes: int) -> int:
  """Checks one DICOM file's pixel header against its pixel data (before `pixel_array`
  allocates); returns the bytes decoding it needs."""
  rows, cols = int(getattr(ds, 'Rows', 0) or 0), int(getattr(ds, 'Columns', 0) or 0)
  frames = int(getattr(ds, 'NumberOfFrames', 1) or 1)
  samples = int(getattr(ds, 'SamplesPerPixel', 1) or 1)
  bits = int(getattr(ds, 'BitsAllocated', 8) or 8)
  pixels = rows * cols * frames * samples
  memory = pixels * max(1, -(-bits // 8))
  payload, file_bytes = None, None
  meta = getattr(ds, 'file_meta', None)
  syntax = getattr(meta, 'TransferSyntaxUID', None) if meta is not None else None
  if 'PixelData' in ds and (syntax is None or not syntax.is_compressed):
    payload, file_bytes = -(-pixels * bits // 8), len(ds.PixelData)
  _check_size(f'DICOM {name} ({rows} x {cols} x {frames} frames x {samples} samples, {bits} '
              'bits)', memory, max_bytes, payload, file_bytes=file_bytes)
  return memory


def _dicom_to_ras(volume: np.ndarray, slices: list, positions) -> tuple[np.ndarray, list, str]:
  """[rows, cols, slices] in the DICOM patient frame (LPS) -> RAS axis order, spacing, codes."""
  import nibabel as nib
  iop = np.asarray(slices[0].ImageOrientationPatient, float)
  x_dir, y_dir = iop[:3], iop[3:]     # x_dir: along a row (column index), y_dir: down rows
  row_sp, col_sp = (float(v) for v in slices[0].PixelSpacing)
  if len(slices) > 1:
    step = (np.asarray(positions[-1]) - np.asarray(positions[0])) / (len(slices) - 1)
  else:
    step = np.cross(x_dir, y_dir) * float(getattr(slices[0], 'SliceThickness', 1) or 1)
  affine = np.eye(4)
  affine[:3, 0], affine[:3, 1], affine[:3, 2] = y_dir * row_sp, x_dir * col_sp, step
  affine[:2] *= -1                     # LPS -> RAS
  spacing = _check_spacing([row_sp, col_sp, float(np.linalg.norm(step))])   # before orienting
  source = ''.join(nib.orientations.aff2axcodes(affine))
  ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                         nib.orientations.axcodes2ornt('RAS'))
  out = nib.orientations.apply_orientation(volume, ornt)
  ras_spacing = [0.0] * 3
  for axis, (new_axis, _) in enumerate(ornt):
    ras_spacing[int(new_axis)] = spacing[axis]
  return np.ascontiguousarray(out), ras_spacing, source


def dicom_files(path: str) -> list[str]:
  """The files of a DICOM input: the file itself, or a folder's non-hidden files in name order."""
  if not os.path.isdir(path):
    return [path]
  return [os.path.join(path, f) for f in sorted(os.listdir(path)) if not f.startswith('.')]


def _sort_slices(slices: list) -> bool:
  """Sorts a series' (dataset, pixels) along the slice normal (ImagePositionPatient), or by
  InstanceNumber when no slice has patient geometry (returns whether they have it). RejectedScan
  when the order or the spacing cannot be trusted: geometry on some slices only, slices of
  different orientations, two at one position, uneven gaps (a missing slice), or no geometry and
  no distinct InstanceNumbers."""
  names = [os.path.basename(getattr(ds, 'filename', '') or '?') for ds, _ in slices]
  has = [hasattr(ds, 'ImagePositionPatient') and hasattr(ds, 'ImageOrientationPatient')
         for ds, _ in slices]
  if any(has) and not all(has):
    raise RejectedScan(f'{names[has.index(False)]} has no ImagePositionPatient / '
                       'ImageOrientationPatient while other slices do; expected it on every slice')
  if not any(has):
    numbers = [getattr(ds, 'InstanceNumber', None) for ds, _ in slices]
    if len(slices) > 1 and (None in numbers or len({int(n) for n in numbers}) < len(numbers)):
      raise RejectedScan('slices without patient geometry and without distinct InstanceNumbers '
                         'cannot be ordered; expected ImagePositionPatient or InstanceNumber')
    slices.sort(key=lambda s: int(s[0].InstanceNumber or 0) if len(slices) > 1 else 0)
    return False
  iop = np.asarray(slices[0][0].ImageOrientationPatient, float)
  for (ds, _), name in zip(slices, names):
    if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-4):
      raise RejectedScan(f'{name}: ImageOrientationPatient {list(ds.ImageOrientationPatient)} '
                         f'differs from {names[0]}\'s {iop.tolist()}; expected one orientation')
  normal = np.cross(iop[:3], iop[3:])
  slices.sort(key=lambda s: float(np.dot(normal, np.asarray(s[0].ImagePositionPatient, float))))
  along = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for ds, _ in slices]
  if any(b - a == 0 for a, b in zip(along, along[1:])) or not np.isfinite(along).all():
    raise RejectedScan('two slices at one position (or a non-finite ImagePositionPatient); '
                       'expected one slice per position, one series per folder')
  gaps = np.diff(along)
  if len(gaps) > 1 and np.ptp(gaps) > max(0.01, 0.01 * float(np.median(gaps))):
    raise RejectedScan(f'uneven slice gaps ({gaps.min():g} to {gaps.max():g} mm along the slice '
                       'normal: a missing slice?); expected evenly spaced slices')
  return True


def read_dicom(path: str, max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> tuple[np.ndarray, dict]:
  import pydicom
  files = dicom_files(path)
  if not files:
    raise RejectedScan('empty DICOM folder')
  slices, memory = [], 0
  for f in files:
    try:
      ds = pydicom.dcmread(f)          # holds at most the file's bytes
    except Exception as e:
      raise RejectedScan(f'unreadable DICOM {os.path.basename(f)}: {type(e).__name__}: {e}') from e
    # The whole series must fit: each file's header is checked before its pixels are decoded.
    memory += _dicom_pixel_bytes(ds, os.path.basename(f), max_bytes - memory)
    try:
      pixels = ds.pixel_array
    except Exception as e:
      raise RejectedScan(f'unreadable DICOM {os.path.basename(f)}: {type(e).__name__}: {e}') from e
    slices.append((ds, pixels))
  series = {getattr(ds, 'SeriesInstanceUID', None) for ds, _ in slices}
  if len(series) > 1:
    raise RejectedScan(f'folder holds {len(series)} series; give one folder per series')
  ds0, px0 = slices[0]
  modality = str(getattr(ds0, 'Modality', '') or '')
  attrs = {'modality': modality, 'source_dtype': str(px0.dtype)}
  samples_per_pixel = int(getattr(ds0, 'SamplesPerPixel', 1) or 1)
  if 'PerFrameFunctionalGroupsSequence' in ds0 or 'SharedFunctionalGroupsSequence' in ds0:
    raise RejectedScan('an enhanced multi-frame DICOM (its rescale and geometry are in '
                       'functional groups, which this reader does not apply); expected classic '
                       'single-frame slices or a NIfTI (dcm2niix converts either)')
  if len(slices) == 1 and (samples_per_pixel == 3 or px0.ndim == 3):
    # Colour image [rows, cols, 3] or a multi-frame volume [frames, rows, cols].
    if samples_per_pixel == 3:
      if px0.ndim != 3:
        raise RejectedScan(f'a multi-frame colour DICOM ({px0.shape[0]} frames); expected one '
                           'colour image per file')
      array = np.moveaxis(px0[..., :3], -1, 0)[..., None]
    else:
      array = np.moveaxis(_rescale(ds0, px0), 0, -1)[None]
      if hasattr(ds0, 'PixelSpacing'):
        attrs['spacing'] = [float(v) for v in ds0.PixelSpacing] + [1.0]
    return array, attrs
  names = [os.path.basename(f) for f in files]
  for name, (_, p) in zip(names, slices):
    if p.ndim != 2:
      raise RejectedScan(f'{name}: pixel data of shape {list(p.shape)} in a series of '
                         f'{len(slices)} files; expected one 2D slice per file')
    if p.shape != px0.shape:     # e.g. a scout / localizer image in the series folder
      raise RejectedScan(f'{name}: a {p.shape[0]} x {p.shape[1]} slice where {names[0]} is '
                         f'{px0.shape[0]} x {px0.shape[1]}; expected slices of one size (one '
                         'series per folder)')
  has_geometry = _sort_slices(slices)
  volume = np.stack([_rescale(ds, p) for ds, p in slices], axis=-1)   # [rows, cols, slices]
  if has_geometry and hasattr(ds0, 'PixelSpacing'):
    positions = [np.asarray(ds.ImagePositionPatient, float) for ds, _ in slices]
    volume, spacing, source = _dicom_to_ras(volume, [ds for ds, _ in slices], positions)
    attrs.update(spacing=spacing, orientation='RAS', source_orientation=source)
  elif hasattr(ds0, 'PixelSpacing'):
    attrs['spacing'] = [float(v) for v in ds0.PixelSpacing] + [1.0]
  return volume[None], attrs


_PIL_BYTES = {'I;16': 2, 'I;16B': 2, 'I;16L': 2, 'I': 4, 'F': 4}
_PIL_GRAY = ('L', 'I;16', 'I;16B', 'I')


def _png_16bit_with_channels(path: str) -> bool:
  """Whether a PNG's IHDR chunk says 16 bits per sample in a colour type other than 0 (grey):
  Pillow keeps 16 bits for grey only."""
  with open(path, 'rb') as f:
    head = f.read(26)
  return len(head) == 26 and head[24] == 16 and head[25] != 0


def read_image(path: str, max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> tuple[np.ndarray, dict]:
  from PIL import Image
  try:
    with Image.open(path) as img:    # reads the header only
      mode, (width, height) = img.mode, img.size
      bands = 1 if mode in _PIL_GRAY else 3
      memory = width * height * max(bands, len(img.getbands())) * _PIL_BYTES.get(mode, 1)
      png = img.format == 'PNG'
      frames = getattr(img, 'n_frames', 1)
      if frames > 1:
        raise RejectedScan(f'an animated {img.format} of {frames} frames; expected one image '
                           '(a series of slices: DICOM, NIfTI or .npy)')
      if png and _png_16bit_with_channels(path):
        raise RejectedScan('a 16-bit colour (or grey + alpha) PNG, which Pillow reads as 8 bits '
                           'per channel; expected 8-bit colour or 16-bit greyscale (or a .npy of '
                           'the values)')
      _check_size(f'{img.format} {width} x {height} {mode}', memory, max_bytes,
                  payload=memory if png else None,
                  compressed_bytes=os.path.getsize(path) if png else None)
      img.load()
      if mode in _PIL_GRAY:
        array = np.asarray(img)[None]
      else:
        array = np.moveaxis(np.asarray(img.convert('RGB')), -1, 0)
  except RejectedScan:
    raise
  except Image.DecompressionBombError as e:   # Pillow's own header check, at open
    raise RejectedScan(f'the image header claims too many pixels ({e}); expected an image '
                       'within the limit') from None
  except Exception as e:
    raise RejectedScan(f'not a readable image: {type(e).__name__}: {e}') from e
  return array[..., None], {'source_dtype': str(array.dtype), 'image_mode': mode}


def npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, data offset) from a .npy header, reading nothing else (also what recipes use
  to count the images of a RadFM case [S, C, H, W, D] without loading it)."""
  fmt = np.lib.format
  with open(path, 'rb') as f:
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), np.dtype(dtype), f.tell()


def read_npy(path: str, index: int | None = None,
             max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> list[tuple[np.ndarray, dict]]:
  try:
    shape, dtype, offset = npy_header(path)
  except Exception as e:
    raise RejectedScan(f'not a readable .npy: {type(e).__name__}: {e}') from e
  if dtype.hasobject:
    raise RejectedScan(f'.npy of Python objects ({dtype}) is not read (pickle); expected numbers')
  payload = math.prod(shape) * dtype.itemsize
  held = os.path.getsize(path) - offset
  _check_size(f'.npy shape {list(shape)} {dtype}', payload, max_bytes, payload, file_bytes=held)
  if held > payload:   # np.save writes the array and nothing after: more is another array's data
    raise RejectedScan(f'.npy shape {list(shape)} {dtype}: the file holds {held - payload:,} bytes '
                       'after the array its header describes; expected one array (a header edited, '
                       'or two files joined?)')
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:
    raise RejectedScan(f'not a readable .npy: {type(e).__name__}: {e}') from e
  attrs = {'source_dtype': str(data.dtype)}
  if data.ndim == 5 and data.shape[1] in (1, 3):
    if data.shape[0] == 0:
      raise RejectedScan(f'the [S, C, H, W, D] stack {list(data.shape)} holds no images; '
                         'expected at least one')
    _check_pick('index', index, data.shape[0],
                f'the [S, C, H, W, D] stack {list(data.shape)} holds {data.shape[0]} images')
    picks = range(data.shape[0]) if index is None else [index]
    return [(data[s], dict(attrs, **{CASE_INDEX: s})) for s in picks]
  if data.ndim in (2, 3) or (data.ndim == 4 and data.shape[0] in (1, 3)):
    _check_pick('index', index, 1, f'.npy shape {list(data.shape)} is one image; index picks one '
                'of a 5D stack [S, C, H, W, D]')
  if data.ndim == 2:
    return [(data[None, :, :, None], attrs)]
  if data.ndim == 3:
    return [(data[None], attrs)]
  if data.ndim == 4 and data.shape[0] in (1, 3):
    return [(data, attrs)]
  raise RejectedScan(f'wrong rank/shape for a RadFM array: {data.shape} (expected [H,W], '
                     '[H,W,D], [C,H,W,D] or [S,C,H,W,D] with C in 1, 3)')


def read_scan(path: str, entry: dict | None = None,
              max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> list[tuple[np.ndarray, dict]]:
  """One manifest image entry -> validated [(array [C, H, W, D] in its storable dtype,
  attributes)]; RejectedScan (an InputError, `path: reason`) otherwise. Used by ingest and by
  generate / eval for raw files, so the header-size guard (`max_bytes`) protects all of them."""
  if not isinstance(path, (str, os.PathLike)):
    raise InputError(f'path: got {type(path).__name__} {repr(path)[:40]}; expected the path of a '
                     'scan (str)')
  if entry is not None and not isinstance(entry, dict):
    raise InputError(f'{path}: image entry: got {type(entry).__name__}; expected a dict such as '
                     '{"frame": 0, "index": 1, "modality": "CT"} (or None)')
  path = os.fspath(path)
  try:
    return _read_scan(path, entry or {}, max_bytes)
  except RejectedScan as e:
    raise RejectedScan(e.reason, path) from None


def _several(count: int, path: str | None = None) -> RejectedScan:
  return RejectedScan(f'holds {count} images (a 5D stack [S, C, H, W, D]); expected one image '
                      f'per <image>: pick it with "index" (0..{count - 1}) in its image entry '
                      '({"path": ..., "index": N} in a generate --input prompts file)', path)


def check_one_image(path: str, entry: dict | None = None):
  """From the header only: RejectedScan when `path` is a 5D .npy stack of several images and
  `entry` picks none with `index`. For what takes one array per `<image>` (generate), before a
  model is loaded; `read_one` makes sure at read time. An unreadable header passes: reading it
  rejects it with its own reason."""
  if not path.lower().endswith('.npy') or (entry or {}).get('index') is not None:
    return
  try:
    shape = npy_header(path)[0]
  except Exception:  # numpy raises several types for a bad header
    return
  if len(shape) == 5 and shape[0] > 1:
    raise _several(shape[0], path)


def read_one(path: str, entry: dict | None = None,
             max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> tuple[np.ndarray, dict]:
  """`read_scan` for one image: a 5D stack read without `index` (several images) is a
  RejectedScan saying how many it holds and how to pick one, never its first image alone."""
  scans = read_scan(path, entry, max_bytes)
  if len(scans) > 1:
    raise _several(len(scans), path)
  return scans[0]


def _read_scan(path: str, entry: dict, max_bytes: int) -> list[tuple[np.ndarray, dict]]:
  if not os.path.exists(path):
    raise RejectedScan('file not found')
  if os.path.isfile(path) and os.path.getsize(path) == 0:   # each library words it its own way
    raise RejectedScan('empty file (0 bytes); expected the scan\'s data (a copy cut short?)')
  lower = path.lower()
  frame, index = entry.get('frame'), entry.get('index')
  # Each field picks along an axis only some formats have (_check_pick); the others hold one.
  one_image = 'is one image; index picks one of a 5D .npy stack [S, C, H, W, D]'
  one_volume = 'is one volume; frame picks one of a 4D NIfTI'
  if lower.endswith(('.nii', '.nii.gz')):
    _check_pick('index', index, 1, f'a NIfTI {one_image}')
    out = [read_nifti(path, frame, max_bytes)]
  elif lower.endswith('.npy'):
    _check_pick('frame', frame, 1, f'a .npy {one_volume}')
    out = read_npy(path, index, max_bytes)
  elif lower.endswith(('.png', '.jpg', '.jpeg')):
    _check_pick('frame', frame, 1, f'a PNG/JPEG image {one_volume}')
    _check_pick('index', index, 1, f'a PNG/JPEG image {one_image}')
    out = [read_image(path, max_bytes)]
  elif os.path.isdir(path) or lower.endswith(('.dcm', '.dicom')):
    _check_pick('frame', frame, 1, f'a DICOM scan {one_volume}')
    _check_pick('index', index, 1, f'a DICOM scan {one_image}')
    out = [read_dicom(path, max_bytes)]
  else:
    raise RejectedScan('unsupported file type (expected .nii[.gz], .dcm or a DICOM folder, '
                       '.png, .jpg/.jpeg, .npy)')
  result = []
  for array, attrs in out:
    attrs = dict(attrs, source=os.path.abspath(path))
    if entry.get('modality'):
      attrs['modality'] = entry['modality']
    attrs.setdefault('modality', '')
    attrs['spacing'] = _check_spacing(attrs.get('spacing', [1.0, 1.0, 1.0]))
    # Without patient geometry: 'image' = H pixel rows, W columns (PNG/JPEG, X-ray DICOM);
    # 'as_stored' = a .npy taken as given.
    attrs.setdefault('orientation', 'as_stored' if lower.endswith('.npy') else 'image')
    try:
      json.dumps(attrs, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise RejectedScan(f'attributes cannot be stored ({e}): {attrs}') from None
    result.append((_validate(array), attrs))
  return result


def source_digest(path: str) -> str:
  """sha256 of a scan's bytes (a DICOM folder: of its files' names and bytes, in name order): the
  content part of a scan's identity, so a file changed at the same path is read again."""
  h = hashlib.sha256()
  for f in dicom_files(path) if os.path.isdir(path) else [path]:
    if os.path.isdir(path):
      h.update(os.path.basename(f).encode() + b'\0')
    with open(f, 'rb') as fh:
      while chunk := fh.read(1 << 20):
        h.update(chunk)
  return h.hexdigest()
