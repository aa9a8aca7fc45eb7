"""`radfm-jax ingest`: scans (NIfTI, DICOM, PNG/JPEG, .npy) + a sample manifest -> a VolumeStore.

    radfm-jax ingest --manifest samples.jsonl --out STORE [--strict] [--replace]
    report = ingest('samples.jsonl', 'STORE')            # or a list of record dicts

Input manifest (JSONL, one training sample per line):

    {"id": "s1", "task": "vqa", "question": "What is shown?", "answer": "A nodule.",
     "images": [{"path": "ct/case1.nii.gz", "position": {"question": 0}, "modality": "CT"}]}

Image entries take `path` (relative paths resolve against the manifest's folder or `root`) and
optional `id` (scan id; default a hash of path/frame/index), `modality`, `frame` (which volume of
a 4D NIfTI), `index` (which image of a 5D RadFM case .npy [S, C, H, W, D]; without it all S
images are used, each at the entry's position). Other sample keys pass through unchanged.

The store is a database (store.py holds its guarantees). Ingest takes the store's lock (a second
ingest waits, saying so) and merges:
  * Before anything is touched: a manifest that does not exist, two samples with one id, or one
    scan id naming two files are errors naming both lines; a sample id already in the store with
    other content (text fields, or its images' scan ids / positions) is an error unless
    `replace`; so is a scan id the store holds for another file.
  * A scan is identified by its id and its content (sha256 of the file, or of a DICOM folder's
    files, kept as the `source_sha256` attribute): a stored scan whose file is unchanged is
    skipped, a changed file is read again and its new version replaces the old one in the index.
  * The new samples extend STORE/manifest.jsonl (same id and content: kept once; `replace`:
    replaced in place); rejects.jsonl and warnings.jsonl describe this run.

Reading rules (stored layout [C, H, W, D], see store.py):
  * Before any voxel is read, the bytes the header claims (NIfTI dim/datatype, DICOM Rows x
    Columns x frames x samples x bits, PNG/JPEG size x bands, .npy header) are checked: an
    uncompressed file must hold them, a .nii.gz / PNG cannot claim more than DEFLATE can expand
    (1032x its size), and no scan may need more than `max_scan_bytes` (default 2 GiB,
    `--max-scan-bytes`). Readers run in `workers` threads, so peak memory is about
    workers x max_scan_bytes at worst.
  * NIfTI: reoriented to RAS with `nib.as_closest_canonical`; 4D: trailing singleton axes are
    squeezed, a real time/echo axis needs `frame`, otherwise the scan is rejected (no silent
    averaging or first-frame pick). Rank > 4 after squeezing is rejected. Spacing is the column
    norms of the RAS affine. A non-finite affine or spacing is a reject; a zero or negative
    pixdim, which nibabel replaces (by 1 / its absolute value) when the geometry comes from
    pixdim (no sform), is kept as repaired and recorded: attribute `spacing_repaired` (the
    header's values) and a line in warnings.jsonl.
  * DICOM: a file or a folder holding one series; slices are sorted by position along the slice
    normal (ImagePositionPatient), else InstanceNumber; RescaleSlope/Intercept applied (stored
    int16 when the result is integral and fits, e.g. CT HU, else float32 if it fits); volumes
    with orientation tags are reoriented LPS -> RAS like NIfTI; a file without them (X-ray) is a
    2D image. Zero / negative / NaN PixelSpacing or two slices at one position: reject.
  * PNG/JPEG: Pillow; grayscale stays 1 channel (16-bit kept), everything else becomes RGB.
  * .npy: [H, W] / [H, W, D] / [C, H, W, D] (C in 1, 3) / [S, C, H, W, D]; other ranks rejected.
A scan is rejected (path, reason -> rejects.jsonl and stderr) when it cannot be read, has a
wrong rank, is empty, holds any NaN/inf voxel (no repair: a NaN has no right value), is constant,
or holds values its stored dtype cannot hold (int64 beyond int32, float64 beyond float32: no wrap,
no inf). A sample with any rejected image is left out of the output manifest. One bad scan never
stops the run: a batch the store refuses is written again scan by scan and only the failing scan
is rejected. Nothing of a rejected scan reaches the store.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Callable, Iterable

import numpy as np

from radfm_jax.data.store import VolumeStore, kill_point, to_storable, write_jsonl
from radfm_jax.errors import InputError, where

DEFAULT_MAX_SCAN_BYTES = 2 << 30
# DEFLATE (gzip, PNG) cannot expand data more than ~1032x (a 258-byte match costs >= 2 bits), so a
# compressed file cannot hold more than this many times its size, whatever its header says.
_DEFLATE_MAX_RATIO = 1032


class IngestError(RuntimeError):
  """Raised by `ingest(..., strict=True)` when any input was rejected."""


class RejectedScan(InputError):
  """An input that cannot become a stored scan. `reason` says why; `path` (set by `read_scan`)
  names the file, and the message is `path: reason`."""

  def __init__(self, reason: str, path: str | None = None):
    super().__init__(f'{path}: {reason}' if path else reason)
    self.reason, self.path = reason, path


@dataclasses.dataclass
class IngestReport:
  stored: list[str] = dataclasses.field(default_factory=list)     # scan ids written this run
  updated: list[str] = dataclasses.field(default_factory=list)    # of those: new content, old id
  skipped: list[str] = dataclasses.field(default_factory=list)    # already in the store
  rejects: list[dict] = dataclasses.field(default_factory=list)   # {'path', 'reason', ...}
  warnings: list[dict] = dataclasses.field(default_factory=list)  # {'path', 'warning', ...}
  samples: int = 0                                                # samples of this manifest kept
  dropped_samples: int = 0
  replaced_samples: int = 0                                       # with `replace`
  manifest_rows: int = 0                                          # rows in the store manifest

  def summary(self) -> str:
    return (f'{len(self.stored)} scans stored ({len(self.updated)} changed on disk), '
            f'{len(self.skipped)} already stored, {len(self.rejects)} rejected, '
            f'{len(self.warnings)} repaired; {self.samples} samples kept, {self.dropped_samples} '
            f'dropped, {self.replaced_samples} replaced; {self.manifest_rows} samples in the store')


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
    array = to_storable(array)
  except ValueError as e:
    raise RejectedScan(str(e)) from None
  if array.min() == array.max():
    raise RejectedScan(f'constant volume (every value {array.flat[0]!r})')
  return array


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


def read_nifti(path: str, frame: int | None = None,
               max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> tuple[np.ndarray, dict]:
  import nibabel as nib
  try:
    img = nib.load(path)             # the header only: voxels are read below, after the checks
  except Exception as e:  # nibabel raises many types for non-NIfTI content
    raise RejectedScan(f'not a readable NIfTI: {type(e).__name__}: {e}') from e
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
  if data.ndim == 4:
    if frame is None:
      raise RejectedScan(f'4D volume with {data.shape[3]} frames; set "frame" to pick one')
    if not 0 <= frame < data.shape[3]:
      raise RejectedScan(f'frame {frame} outside 0..{data.shape[3] - 1}')
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


def _rescale(ds, pixels: np.ndarray) -> np.ndarray:
  slope = float(getattr(ds, 'RescaleSlope', 1) or 1)
  intercept = float(getattr(ds, 'RescaleIntercept', 0) or 0)
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
  if len(slices) == 1 and (samples_per_pixel == 3 or px0.ndim == 3):
    # Colour image [rows, cols, 3] or a multi-frame volume [frames, rows, cols].
    if samples_per_pixel == 3:
      array = np.moveaxis(px0[..., :3] if px0.ndim == 3 else px0[0], -1, 0)[..., None]
    else:
      array = np.moveaxis(_rescale(ds0, px0), 0, -1)[None]
    return array, attrs
  if any(p.shape != px0.shape or p.ndim != 2 for _, p in slices):
    raise RejectedScan('slices differ in shape or are not 2D')
  has_geometry = all(hasattr(ds, 'ImagePositionPatient') and hasattr(ds, 'ImageOrientationPatient')
                     for ds, _ in slices)
  if has_geometry:
    iop = np.asarray(ds0.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda s: float(np.dot(normal, np.asarray(s[0].ImagePositionPatient, float))))
    along = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for ds, _ in slices]
    if any(b - a == 0 for a, b in zip(along, along[1:])) or not np.isfinite(along).all():
      raise RejectedScan('two slices at one position (or a non-finite ImagePositionPatient); '
                         'expected one slice per position, one series per folder')
  else:
    slices.sort(key=lambda s: int(getattr(s[0], 'InstanceNumber', 0) or 0))
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


def read_image(path: str, max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> tuple[np.ndarray, dict]:
  from PIL import Image
  try:
    with Image.open(path) as img:    # reads the header only
      mode, (width, height) = img.mode, img.size
      bands = 1 if mode in _PIL_GRAY else 3
      memory = width * height * max(bands, len(img.getbands())) * _PIL_BYTES.get(mode, 1)
      png = img.format == 'PNG'
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


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, data offset) from a .npy header, reading nothing else."""
  fmt = np.lib.format
  with open(path, 'rb') as f:
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), np.dtype(dtype), f.tell()


def read_npy(path: str, index: int | None = None,
             max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> list[tuple[np.ndarray, dict]]:
  try:
    shape, dtype, offset = _npy_header(path)
  except Exception as e:
    raise RejectedScan(f'not a readable .npy: {type(e).__name__}: {e}') from e
  if dtype.hasobject:
    raise RejectedScan(f'.npy of Python objects ({dtype}) is not read (pickle); expected numbers')
  payload = math.prod(shape) * dtype.itemsize
  _check_size(f'.npy shape {list(shape)} {dtype}', payload, max_bytes, payload,
              file_bytes=os.path.getsize(path) - offset)
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:
    raise RejectedScan(f'not a readable .npy: {type(e).__name__}: {e}') from e
  attrs = {'source_dtype': str(data.dtype)}
  if data.ndim == 2:
    return [(data[None, :, :, None], attrs)]
  if data.ndim == 3:
    return [(data[None], attrs)]
  if data.ndim == 4 and data.shape[0] in (1, 3):
    return [(data, attrs)]
  if data.ndim == 5 and data.shape[1] in (1, 3):
    picks = range(data.shape[0]) if index is None else [index]
    if index is not None and not 0 <= index < data.shape[0]:
      raise RejectedScan(f'index {index} outside 0..{data.shape[0] - 1}')
    return [(data[s], dict(attrs, case_index=s)) for s in picks]
  raise RejectedScan(f'wrong rank/shape for a RadFM array: {data.shape} (expected [H,W], '
                     '[H,W,D], [C,H,W,D] or [S,C,H,W,D] with C in 1, 3)')


def read_scan(path: str, entry: dict | None = None,
              max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> list[tuple[np.ndarray, dict]]:
  """One manifest image entry -> validated [(array [C, H, W, D] in its storable dtype,
  attributes)]; RejectedScan (an InputError, `path: reason`) otherwise. Used by ingest and by
  generate / eval for raw files, so the header-size guard (`max_bytes`) protects all of them."""
  try:
    return _read_scan(path, entry or {}, max_bytes)
  except RejectedScan as e:
    raise RejectedScan(e.reason, path) from None


def _read_scan(path: str, entry: dict, max_bytes: int) -> list[tuple[np.ndarray, dict]]:
  if not os.path.exists(path):
    raise RejectedScan('file not found')
  lower = path.lower()
  if lower.endswith(('.nii', '.nii.gz')):
    out = [read_nifti(path, entry.get('frame'), max_bytes)]
  elif lower.endswith('.npy'):
    out = read_npy(path, entry.get('index'), max_bytes)
  elif lower.endswith(('.png', '.jpg', '.jpeg')):
    out = [read_image(path, max_bytes)]
  elif os.path.isdir(path) or lower.endswith(('.dcm', '.dicom')):
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


# ------------------------------------------------------------------------------------------------
# Driver


def scan_id_for(path: str, entry: dict) -> str:
  if entry.get('id'):
    return str(entry['id'])
  key = json.dumps([os.path.abspath(path), entry.get('frame'), entry.get('index')])
  return hashlib.sha1(key.encode()).hexdigest()[:20]


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


def _load_records(manifest) -> tuple[list[tuple[int, dict]], str, Callable]:
  """([(line, record)], base folder of relative paths, place(line, field) -> 'FILE line N field F').

  A manifest path that does not exist or a line that is not a JSON object is an InputError here,
  before the store is touched. A list of records is numbered 1, 2, ... ('manifest record N')."""
  if not isinstance(manifest, (str, os.PathLike)):
    def place(n, field=None):
      return f'manifest record {n}' + (f' field {field}' if field else '')
    return list(enumerate(manifest, 1)), os.getcwd(), place
  path = os.fspath(manifest)
  if not os.path.isfile(path):
    raise InputError(f'{where(path)}: manifest not found; expected a JSONL file, one sample per '
                     'line (nothing was written)')
  records = []
  with open(path, 'rb') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError as e:
        raise InputError(f'{where(path, n)}: not valid JSON ({e}); expected one JSON object per '
                         'line') from None
      if not isinstance(rec, dict):
        raise InputError(f'{where(path, n)}: got {type(rec).__name__}; expected a JSON object')
      records.append((n, rec))
  return records, os.path.dirname(os.path.abspath(path)), lambda n, field=None: where(path, n, field)


def _expand_ids(scan_id: str, n: int) -> list[str]:
  return [scan_id] if n == 1 else [f'{scan_id}_{s}' for s in range(n)]


def _stored_ids(index: dict, sid: str) -> list[str]:
  """The ids under which entry id `sid` is stored ([sid], or sid_0, sid_1, ... of a 5D case)."""
  if sid in index:
    return [sid]
  ids = []
  while f'{sid}_{len(ids)}' in index:
    ids.append(f'{sid}_{len(ids)}')
  return ids


def _sample_row(rec: dict, n: int, images: list[dict]) -> dict:
  out = {k: v for k, v in rec.items() if k != 'images'}
  out.setdefault('id', str(n))
  out.setdefault('question', '')
  out.setdefault('answer', '')
  out.setdefault('task', '')
  out['images'] = images
  return out


def _difference(old: dict, new: dict) -> str | None:
  """The first field in which two sample rows differ (images: by scan id and position), or None."""
  for key in sorted(set(old) | set(new)):
    if key == 'images':
      a = [(im.get('id'), im.get('position')) for im in old.get('images', [])]
      b = [(im.get('id'), im.get('position')) for im in new.get('images', [])]
      if a != b:
        return 'images'
    elif old.get(key) != new.get(key):
      return key
  return None


@dataclasses.dataclass
class _Entry:
  sid: str                 # scan id of the entry (5D cases are stored as sid_0, sid_1, ...)
  path: str                # absolute path
  entry: dict              # the manifest image entry
  place: str               # where it was first named ('FILE line N field images[k]')

  @property
  def source_key(self) -> list:
    return [self.path, self.entry.get('frame'), self.entry.get('index')]


def _collect(records, base, place) -> dict[str, _Entry]:
  """Unique image entries in first-seen order; duplicate sample ids and a scan id naming two files
  are InputErrors naming both lines."""
  entries: dict[str, _Entry] = {}
  sample_lines: dict[str, int] = {}
  for n, rec in records:
    if 'id' in rec:
      first = sample_lines.setdefault(str(rec['id']), n)
      if first != n:
        raise InputError(f'{place(n, "id")}: sample id {rec["id"]!r} is already the id of '
                         f'{place(first)}; expected unique sample ids')
    images = rec.get('images', [])
    if not isinstance(images, list):
      raise InputError(f'{place(n, "images")}: got {images!r}; expected a list of image objects')
    for k, entry in enumerate(images):
      if not isinstance(entry, dict) or not isinstance(entry.get('path'), str):
        raise InputError(f'{place(n, f"images[{k}].path")}: missing; expected the scan\'s file')
      path = os.path.abspath(os.path.join(base, entry['path']))
      e = _Entry(scan_id_for(path, entry), path, entry, place(n, f'images[{k}]'))
      seen = entries.setdefault(e.sid, e)
      if seen.source_key != e.source_key:
        raise InputError(f'{place(n, f"images[{k}].id")}: scan id {e.sid!r} names {e.path} '
                         f'(frame {e.entry.get("frame")}, index {e.entry.get("index")}) but '
                         f'{seen.place} names {seen.path} (frame {seen.entry.get("frame")}, index '
                         f'{seen.entry.get("index")}) with it; expected one file per scan id')
  return entries


def ingest(manifest: str | Iterable[dict], out_dir: str, strict: bool = False,
           root: str | None = None, batch_size: int = 16, workers: int | None = None,
           log=None, replace: bool = False, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES,
           progress: bool = False, lock_timeout: float | None = None) -> IngestReport:
  """Reads every image of every sample into the store `out_dir` and merges the samples into its
  manifest (module docstring: the rules; store.py: the guarantees).

  Returns an IngestReport; with `strict`, raises IngestError after writing everything that was
  readable (rejects.jsonl lists all failures, so one run shows every problem). Bad manifests and
  conflicts with the store raise InputError before anything is written. `replace`: a sample id
  (or a scan id) the store holds with other content is replaced instead of refused.
  `progress`: a tqdm bar (scans done / total, rejects) on `log`. Messages go to `log` (default:
  sys.stderr as it is at call time, not at import). `lock_timeout`: seconds to wait for another
  writer (None: wait as long as it takes).
  """
  log = log or sys.stderr
  records, base, place = _load_records(manifest)
  base = os.path.abspath(root) if root else base
  entries = _collect(records, base, place)
  store = VolumeStore(out_dir)
  report = IngestReport()
  with store.lock(lock_timeout, log):
    index = store.index()
    _check_scan_ids(entries, index, replace)
    old_rows = store.manifest()
    old_at = {str(r.get('id')): i for i, r in enumerate(old_rows)}
    _check_samples(records, base, index, old_rows, old_at, place, replace, store.manifest_path)
    resolved = _store_scans(store, entries, report, batch_size, workers, log, max_scan_bytes,
                            progress)
    rows = _merge_samples(records, base, resolved, old_rows, old_at, store.index(), report)
    kill_point('before-manifest')
    write_jsonl(store.manifest_path, rows)
    write_jsonl(store.rejects_path, report.rejects)
    write_jsonl(store.warnings_path, report.warnings)
  report.manifest_rows = len(rows)
  print(f'ingest: {report.summary()} -> {store.root}', file=log)
  if strict and report.rejects:
    raise IngestError(f'{len(report.rejects)} inputs rejected (see {store.rejects_path})')
  return report


def _check_scan_ids(entries: dict[str, _Entry], index: dict, replace: bool):
  """A scan id the store holds for another file is an error unless `replace`."""
  if replace:
    return
  for e in entries.values():
    for i in _stored_ids(index, e.sid):
      key = index[i]['attributes'].get('source_key')
      if key is not None and key != e.source_key:
        raise InputError(f'{e.place}.id: scan id {e.sid!r} names {e.path} but the store holds it '
                         f'for {key[0]} (frame {key[1]}, index {key[2]}); expected the same file, '
                         'another id, or --replace')


def _sids(rec: dict, base: str) -> list[str]:
  """The entry scan ids of a record's images, in order."""
  return [scan_id_for(os.path.abspath(os.path.join(base, e['path'])), e)
          for e in rec.get('images', [])]


def _check_samples(records, base, index, old_rows, old_at, place, replace, manifest_path):
  """A sample id the store holds with other content (text fields, image scan ids or positions)
  is an error unless `replace`. A scan whose file changed keeps its id: not a conflict."""
  if replace:
    return
  for i, (n, rec) in enumerate(records):
    row_id = str(rec.get('id', i))
    if row_id not in old_at:
      continue
    images = [{'id': j, 'position': entry.get('position', {'question': 0})}
              for entry, sid in zip(rec.get('images', []), _sids(rec, base))
              for j in (_stored_ids(index, sid) or [sid])]
    field = _difference(old_rows[old_at[row_id]], _sample_row(rec, i, images))
    if field is not None:
      raise InputError(f'{place(n, field)}: sample id {row_id!r} is already in the store '
                       f'({manifest_path}) with another {field}; expected the same sample, another '
                       'id, or --replace to replace it')


def _store_scans(store: VolumeStore, entries: dict[str, _Entry], report: IngestReport,
                 batch_size: int, workers: int | None, log, max_scan_bytes: int,
                 progress: bool) -> dict[str, list[str] | None]:
  """Reads and stores every entry whose content is not stored yet; entry id -> stored ids (None:
  rejected). `batch_size` scans are read at a time (threads: gzip/zstd/pydicom release the GIL)
  and written in one transaction: memory stays bounded by one batch of decoded volumes."""
  from tqdm import tqdm
  index = store.index()

  def load(sid):
    e = entries[sid]
    try:
      digest = source_digest(e.path) if os.path.exists(e.path) else None
      have = _stored_ids(index, sid)
      if digest and have and all(index[i]['attributes'].get('source_sha256') == digest
                                 and index[i]['attributes'].get('source_key') in (None, e.source_key)
                                 for i in have):
        return sid, 'same', have
      scans = read_scan(e.path, e.entry, max_scan_bytes)
      for _, attrs in scans:
        attrs.update(source_sha256=digest, source_key=e.source_key)
      return sid, 'read', scans
    except RejectedScan as err:
      return sid, 'reject', err.reason
    except Exception as err:  # any reader bug still must not stop the run
      return sid, 'reject', f'{type(err).__name__}: {err}'

  resolved: dict[str, list[str] | None] = {}
  bar = tqdm(total=len(entries), desc='ingest', unit='scan', file=log, disable=not progress,
             dynamic_ncols=True)
  todo = list(entries)
  with bar, concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    for start in range(0, len(todo), batch_size):
      pending = []
      for sid, kind, value in pool.map(load, todo[start:start + batch_size]):
        if kind == 'same':
          resolved[sid] = value
          report.skipped.extend(value)
        elif kind == 'reject':
          _reject(report, resolved, entries[sid], value, log, bar)
        else:
          ids = _expand_ids(sid, len(value))
          pending.append((sid, [(i, a, attrs) for i, (a, attrs) in zip(ids, value)]))
      _write(store, pending, report, resolved, entries, log, bar)
      bar.update(min(batch_size, len(todo) - start))
      bar.set_postfix(rejected=len(report.rejects), refresh=False)
  return resolved


def _reject(report, resolved, e: _Entry, reason: str, log, bar):
  resolved[e.sid] = None
  report.rejects.append({'path': e.path, 'scan_id': e.sid, 'reason': reason})
  bar.write(f'ingest: rejected {e.path}: {reason}', file=log)


def _write(store, pending, report, resolved, entries, log, bar):
  """Writes one batch [(entry id, [(scan id, array, attrs)])] in one transaction; if the store
  refuses it, each entry is written alone so that only the failing one is rejected."""
  if not pending:
    return
  before = set(store.index())
  try:
    store.write_batch([item for _, scans in pending for item in scans])
    done = pending
  except Exception:  # retried one entry at a time below, which names the failing scan
    done = []
    for sid, scans in pending:
      try:
        store.write_batch(scans)
        done.append((sid, scans))
      except Exception as err:
        _reject(report, resolved, entries[sid], f'store write failed: {type(err).__name__}: '
                f'{err}', log, bar)
  for sid, scans in done:
    ids = [i for i, _, _ in scans]
    resolved[sid] = ids
    report.stored.extend(ids)
    report.updated.extend(i for i in ids if i in before)
    for i, _, attrs in scans:
      if 'spacing_repaired' in attrs:
        warning = (f'spacing repaired: header pixdim {attrs["spacing_repaired"]} -> spacing '
                   f'{attrs["spacing"]} mm (nibabel replaces 0 by 1 and negatives by their '
                   'absolute value)')
        report.warnings.append({'path': entries[sid].path, 'scan_id': i, 'warning': warning})
        bar.write(f'ingest: repaired {entries[sid].path}: {warning}', file=log)


def _merge_samples(records, base, resolved, old_rows, old_at, index, report) -> list[dict]:
  """The store manifest after this run: the old rows in order (a sample of this manifest with the
  same id replaces its row), then the new samples; every image's shape and modality from the
  index (a changed file may have changed them)."""
  rows = list(old_rows)
  for i, (n, rec) in enumerate(records):
    images, bad = [], None
    for entry, sid in zip(rec.get('images', []), _sids(rec, base)):
      ids = resolved.get(sid)
      if ids is None:
        bad = os.path.abspath(os.path.join(base, entry['path']))
        break
      images += [{'id': j, 'position': entry.get('position', {'question': 0})} for j in ids]
    if bad is not None:
      report.dropped_samples += 1
      report.rejects.append({'path': bad, 'sample_id': rec.get('id', i),
                             'reason': 'sample dropped: one of its images was rejected'})
      continue
    row = _sample_row(rec, i, images)
    report.samples += 1
    at = old_at.get(str(row['id']))
    if at is None:
      old_at[str(row['id'])] = len(rows)
      rows.append(row)
    else:
      report.replaced_samples += _difference(rows[at], row) is not None
      rows[at] = row
  for row in rows:
    for im in row.get('images', []):
      if im.get('id') in index:
        info = index[im['id']]
        im.update(shape=info['shape'], modality=info['attributes'].get('modality', ''))
  return rows
