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
    (the header's values as text) and a line in STORE/warnings.jsonl. Any other header field
    nibabel fixes on load (sizeof_hdr, pixdim, qfac, bitpix, ...) is a recorded repair too
    (`header_repaired`: 'FIELD OLD -> NEW (nibabel: its message)'), and a problem it reports but
    leaves is a warning (`header_warnings`): nibabel's own stderr lines are not printed
    (`_logged_lines`). Rejected in our words: a size dim[i] < 1, an infinite scl_slope (nibabel
    would read it as no scaling; NaN, which nibabel itself writes for "unset", and 0 are no
    scaling), a non-finite scl_inter, a vox_offset inside the header (below 352; NIfTI-2: 544),
    a file (a .nii.gz: its decompressed stream) longer than vox_offset + the voxels its header
    describes. qform_code = sform_code = 0: nibabel's affine from pixdim alone (x flipped) is
    used, a recorded repair (`geometry_assumed`).
  * DICOM: a file or a folder holding one series; slices are sorted by position along the slice
    normal (ImagePositionPatient), else consecutive InstanceNumbers (a gap: a reject);
    RescaleSlope/Intercept applied (int16 when the result is integral and fits, e.g. CT HU, else
    float32 when it fits, with the float64 scans' rounding warning below, e.g. an intercept of
    1e9); volumes with
    orientation tags are reoriented LPS -> RAS like NIfTI; a file without them (X-ray) is a 2D
    image. Zero / negative / NaN PixelSpacing, or two slices at one position: reject; so is a
    geometry field that is not its count of finite numbers (`_check_dicom_numbers`: PixelSpacing
    '0.8\\0.7x', a 5-value ImageOrientationPatient), and so is a PixelSpacing that differs
    between the files of a series. A volume's spacing that is not in the files (no PixelSpacing,
    slices without positions, a multi-frame file's frames) is 1.0 mm, a recorded repair
    (`geometry_assumed`). What pydicom warns of and reads anyway
    (excess pixel-data padding it drops) is the warning `dicom_warnings`, not a stderr line.
    PhotometricInterpretation (attribute `photometric_interpretation`): one sample per pixel must
    be MONOCHROME1, MONOCHROME2 or PALETTE COLOR (else a reject), one for the series; a PALETTE
    COLOR image (one file) is stored as RGB through its lookup tables, as an RGB DICOM
    (`palette_applied`; its indices are not grey values); MONOCHROME1 is inverted to
    min + max - x in its own dtype, so that higher values are brighter in every stored scan (a
    recorded repair: `monochrome1_inverted` = [min, max]).
    A folder inside the series folder, or a file that is not DICOM, is a reject.
  * PNG/JPEG: Pillow; grayscale stays 1 channel (8-, 16-bit and int32 kept), 8-bit colour modes
    become 8-bit RGB as the original's convert('RGB') makes them (CMYK, YCbCr, ... converted; an
    alpha channel dropped, transparent pixels a warning in `image_warnings`); a mode conversion
    would narrow (F: float) is a reject. Pillow's warnings are not printed: its
    DecompressionBombWarning is left to the size checks, any other is `image_warnings`.
  * .npy: [H, W] / [H, W, D] / [C, H, W, D] (C in 1, 3) / [S, C, H, W, D]; other ranks rejected;
    never unpickled. A non-native byte order ('>i2') is stored in the native dtype of that width.
  * `frame` (which volume of a 4D NIfTI) and `index` (which image of a 5D .npy stack) pick along
    an axis; a scan without that axis is one frame / one image, so only 0 names it there. Any
    other value is a reject naming the field (`_check_pick`), never ignored.
A scan is rejected (RejectedScan, an InputError: `path: reason`) when it cannot be read, has a
wrong rank, is empty, holds any NaN/inf voxel (no repair: a NaN has no right value), is
constant (a float64 source that only its float32 cast makes constant says so), holds values its
stored dtype cannot hold (int64 beyond int32, float64 beyond float32: no wrap, no inf), or has
spacing that is not finite and positive. A float64 source stored as float32 whose values change by
more than its range / 2**17 (float32 resolves it more coarsely than 16 bits over its range, e.g.
1e8 + noise) is stored with a warning: attribute `float32_rounding` (`_float32_rounding`).
Ingest turns these attributes into STORE/warnings.jsonl rows and stderr lines (ingest.scan_notes).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import os
import threading
import warnings
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


def _validate(array: np.ndarray, attrs: dict) -> np.ndarray:
  """Checked array in its storable dtype (store.to_storable), or RejectedScan. A float64 source
  whose float32 values lose what tells them apart (`_float32_rounding`) gets the attribute
  `float32_rounding`, which ingest records as a warning."""
  if array.ndim != 4:
    raise RejectedScan(f'wrong rank: shape {array.shape}')
  stored = checked_values(array)
  lo, hi = stored.min(), stored.max()
  if lo == hi:
    source_lo, source_hi = array.min(), array.max()
    if source_lo != source_hi:       # not constant before the cast: float64 -> float32
      value = abs(lo) if lo == 0 else lo                 # -0.0 (tiny negatives) said as 0.0
      raise RejectedScan(f'{array.dtype.name} values collapse to a single {stored.dtype.name} '
                         f'value {value} (source range {source_lo} to {source_hi}); expected '
                         f'values that {stored.dtype.name} can tell apart')
    raise RejectedScan(f'constant volume (every value {lo})')
  rounding = _float32_rounding(array, stored)
  if rounding is not None:
    attrs['float32_rounding'] = rounding
  return stored


# A float64 -> float32 cast is worth a warning when it changes a value by more than half a step of
# 2**16 even steps over the scan's range: float32 then resolves the scan more coarsely than 16-bit
# integers spanning its values would (a large offset such as 1e8 + noise), while the rounding
# every float64 value gets (about 1e-7 of its magnitude) is not (docs/data.md, "float64 scans").
_ROUNDING_STEPS = 2 ** 17


def _float32_rounding(source: np.ndarray, stored: np.ndarray) -> dict | None:
  """For a float64 `source` stored as float32 (`stored`): {'max_abs_change', 'distinct_values':
  [in the source, stored], 'source_range': [min, max]} when the largest change exceeds the
  scan's range / 2**17 (`_ROUNDING_STEPS`), else None. Computed a slice at a time."""
  if source.dtype.kind != 'f' or source.dtype.itemsize <= stored.dtype.itemsize:
    return None
  change = 0.0
  for k in range(source.shape[-1]):
    change = max(change, float(np.abs(stored[..., k].astype(np.float64) - source[..., k]).max()))
  lo, hi = float(source.min()), float(source.max())
  if change <= (hi - lo) / _ROUNDING_STEPS:
    return None
  return {'max_abs_change': change,
          'distinct_values': [int(np.unique(source).size), int(np.unique(stored).size)],
          'source_range': [lo, hi]}


def checked_values(array: np.ndarray) -> np.ndarray:
  """`array` in its storable dtype (store.to_storable: float64 within float32's range becomes
  float32, int64 within int32 int32, a non-native byte order the native dtype of its width, ...),
  or RejectedScan: empty, any NaN / inf, a dtype that is not real numbers (complex, object,
  strings), a value that does not fit. What a scan read by ingest and an array given to
  `generate` both pass."""
  if array.size == 0:
    raise RejectedScan(f'empty array: shape {array.shape}')
  if not array.dtype.isnative:         # e.g. a big-endian '>i2' .npy / NIfTI: int16, same values
    array = array.astype(array.dtype.newbyteorder('='))
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


def _nifti_pixdim_repair(raw, img) -> list[str] | None:
  """The header's own pixdim[1:4] (as text; `raw`: the header as the file holds it) when nibabel
  repaired them on load (0 -> 1, negative -> absolute value) and the geometry comes from them (no
  sform); else None."""
  if int(img.header['sform_code']) > 0:
    return None                      # the sform is the geometry; pixdim is not used
  pixdim = raw['pixdim'][1:4]
  ndim = min(3, len(img.shape))
  if all(float(v) > 0 for v in pixdim[:ndim]):
    return None
  return [repr(float(v)) for v in pixdim]


def _raw_nifti_header(path: str, klass=None):
  """The header as the file holds it (`nib.load` checks it and fixes some fields,
  `_nifti_header_fixes`), as a `klass` header (default: NIfTI-2 when its bytes say so, else
  NIfTI-1)."""
  import nibabel as nib
  with nib.openers.ImageOpener(path) as f:
    if klass is None:
      klass = (nib.Nifti2Header if nib.Nifti2Header.may_contain_header(f.read(540))
               else nib.Nifti1Header)
      f.seek(0)
    return klass.from_fileobj(f, check=False)


def _check_nifti_header(raw):
  """RejectedScan for header fields nibabel would misread or fail on in its own words: a size
  (dim[1..dim[0]]) below 1, an infinite scl_slope (nibabel reads any non-finite slope as 'no
  scaling' and would store the raw values; NaN is the unset value nibabel itself writes, read as
  no scaling, like 0), a non-finite scl_inter with a scaling slope."""
  dim = [int(v) for v in raw['dim']]
  for i in range(1, min(max(dim[0], 0), 7) + 1):
    if dim[i] < 1:
      raise RejectedScan(f'dim[{i}] = {dim[i]} in the NIfTI header (dim {dim[1:dim[0] + 1]}); '
                         'expected positive sizes')
  slope, inter = float(raw['scl_slope']), float(raw['scl_inter'])
  if math.isinf(slope):
    raise RejectedScan(f'scl_slope {slope} in the NIfTI header; expected a finite scale factor (0 '
                       'or NaN: no scaling)')
  if math.isfinite(slope) and slope != 0 and not math.isfinite(inter):
    raise RejectedScan(f'scl_inter {inter} in the NIfTI header (scl_slope {slope:g}); expected a '
                       'finite intercept')


def _check_vox_offset(raw):
  """RejectedScan for a single-file NIfTI whose vox_offset (in `raw`, the header as the file
  holds it) lies inside the header: nibabel reads the voxels from byte 0 for a vox_offset of 0
  (the header's own bytes stored as voxels) and moves one of 1..351 to 352, either way a guess
  at where the voxels start."""
  offset = float(raw['vox_offset'])
  end = type(raw).single_vox_offset     # 348 (540) header bytes + 4 extension-flag bytes
  if bytes(raw['magic'])[:3] in (b'n+1', b'n+2') and offset < end:
    raise RejectedScan(f'vox_offset {offset:g} in the NIfTI header: the voxel data would start '
                       f'inside the {end}-byte header; expected a vox_offset of at least {end}')


def _plain(value) -> str:
  """A header value as a plain number (no numpy repr)."""
  value = np.asarray(value)
  return str(value[()]) if value.ndim == 0 else str([v.item() for v in value])


def _nifti_header_fixes(raw, spacing_repaired: bool) -> tuple[list[str], list[str], set[str]]:
  """What `nib.load` does to the header `raw` (as the file holds it): it runs these checks, fixes
  some fields and logs what it finds ('sizeof_hdr should be 348; set sizeof_hdr to 348'), which
  `_logged_lines` keeps from being printed. Returns (repairs: 'FIELD OLD -> NEW (nibabel:
  MESSAGE)' for each check that changed header fields; warnings: the messages of problems it logs
  at warning level (30) or above and leaves as they are; every message). A pixdim[1,2,3] repair
  that `spacing_repaired` (the attribute) already records is not listed again."""
  header = raw.copy()
  repairs, warnings, said = [], [], set()
  for check in type(raw)._get_checks():
    before = header.copy()
    header, report = check(header, True)
    if not report.problem_level:
      continue
    said.add(report.message)
    changes = []
    for name in header.keys():
      old, new = np.asarray(before[name]), np.asarray(header[name])
      if old.tobytes() == new.tobytes():
        continue
      if old.ndim == 0:
        changes.append(f'{name} {_plain(old)} -> {_plain(new)}')
      else:
        changes += [f'{name}[{i}] {_plain(a)} -> {_plain(b)}'
                    for i, (a, b) in enumerate(zip(old, new)) if a.tobytes() != b.tobytes()]
    if changes:
      if not (spacing_repaired and report.problem_msg.startswith('pixdim[1,2,3]')):
        repairs.append(f'{", ".join(changes)} (nibabel: {report.message})')
    elif report.problem_level >= 30:
      warnings.append(report.message)
  return repairs, warnings, said


class _LoggedLines(logging.Filter):
  """On a library's logger: the lines it logs in a thread inside `_logged_lines` are collected
  there instead of handled (printed); other threads' lines pass."""

  def __init__(self):
    super().__init__()
    self.lines: dict[int, list[str]] = {}

  def filter(self, record) -> bool:
    lines = self.lines.get(record.thread)
    if lines is None:
      return True
    lines.append(record.getMessage())
    return False


_LOGGED_LINES: dict[str, _LoggedLines] = {}
_LOGGED_LINES_LOCK = threading.Lock()


@contextlib.contextmanager
def _logged_lines(logger_name: str):
  """The lines the logger `logger_name` logs in this thread meanwhile (a list), not printed:
  nibabel's ('nibabel.global', whose handler prints on stderr) become a NIfTI's repairs /
  warnings (`read_nifti`), pydicom's ('pydicom') a DICOM's `dicom_warnings` (`read_dicom`);
  ingest writes them to warnings.jsonl and its own stderr line."""
  with _LOGGED_LINES_LOCK:
    if logger_name not in _LOGGED_LINES:
      _LOGGED_LINES[logger_name] = _LoggedLines()
      logging.getLogger(logger_name).addFilter(_LOGGED_LINES[logger_name])
  collector = _LOGGED_LINES[logger_name]
  ident = threading.get_ident()
  lines = collector.lines[ident] = []
  try:
    yield lines
  finally:
    del collector.lines[ident]


# thread ident -> the Python warnings raised in that thread inside `_caught_warnings`
_CAUGHT_WARNINGS: dict[int, list[str]] = {}


def _quiet_warnings():
  """Installs, once, a `warnings.showwarning` for the readers' threads; every other warning goes
  to the `showwarning` it wraps. (`warnings.catch_warnings` would do it for a block, but it swaps
  process-wide state and ingest reads scans in threads.)
    * pydicom says each problem twice: on its logger and as a Python warning (printed on stderr,
      with the line of pydicom that raised it). The warnings raised inside pydicom's package in a
      thread collecting pydicom's logger lines (`_logged_lines('pydicom')`: the same text is kept
      there) are dropped.
    * In a thread inside `_caught_warnings` (reading a NIfTI or an image), a warning is added to
      its list instead of printed: nibabel's and Pillow's (a DecompressionBombWarning, numpy's
      'invalid value encountered' while nibabel builds an affine) would be bare stderr lines
      beside ingest's own; the reader rejects the scan or records the warning."""
  with _LOGGED_LINES_LOCK:
    if getattr(warnings.showwarning, '_radfm_readers', False):
      return
    import pydicom
    package = os.path.dirname(os.path.abspath(pydicom.__file__)) + os.sep
    wrapped = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
      caught = _CAUGHT_WARNINGS.get(threading.get_ident())
      if caught is not None:
        caught.append(f'{category.__name__}: {message}')
        return
      collecting = _LOGGED_LINES.get('pydicom')
      if (collecting is not None and threading.get_ident() in collecting.lines
          and os.path.abspath(str(filename)).startswith(package)):
        return
      wrapped(message, category, filename, lineno, file, line)

    showwarning._radfm_readers = True
    warnings.showwarning = showwarning


@contextlib.contextmanager
def _caught_warnings():
  """The Python warnings raised in this thread meanwhile ('Category: message' each, a list), not
  printed (`_quiet_warnings`). Python shows a warning once per place and text (its
  `__warningregistry__`), so a repeat in a later scan is neither printed nor listed: what the
  readers need a warning for (a non-finite affine or voxel) they check themselves."""
  _quiet_warnings()
  ident = threading.get_ident()
  outer = _CAUGHT_WARNINGS.get(ident)
  caught = _CAUGHT_WARNINGS[ident] = []
  try:
    yield caught
  finally:
    if outer is None:
      del _CAUGHT_WARNINGS[ident]
    else:
      _CAUGHT_WARNINGS[ident] = outer
      outer += caught


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
  """What nibabel logs while loading it (header fields it fixed or found wrong) becomes the
  attributes `header_repaired` / `header_warnings` (`_nifti_header_fixes`), not stderr lines; so
  does a Python warning raised meanwhile (`_caught_warnings`) when the scan is stored. numpy's
  floating-point warnings are not raised at all: every non-finite value they would warn of (an
  affine from an inf pixdim, voxels scaled past float range) is a reject below."""
  with _logged_lines('nibabel.global') as lines, _caught_warnings() as caught, \
       np.errstate(all='ignore'):
    data, attrs, said = _read_nifti(path, frame, max_bytes)
  other = [line for line in dict.fromkeys(lines + caught) if line not in said]
  if other:                          # a line no check of ours explains: kept as nibabel said it
    attrs['header_warnings'] = attrs.get('header_warnings', []) + other
  return data, attrs


def _read_nifti(path: str, frame: int | None, max_bytes: int) -> tuple[np.ndarray, dict, set]:
  import nibabel as nib
  try:
    img = nib.load(path)             # the header only: voxels are read below, after the checks
  except Exception as e:  # nibabel raises many types for non-NIfTI content
    try:
      raw = _raw_nifti_header(path)
    except Exception:  # not a NIfTI header at all: nibabel's reason below
      raw = None
    if raw is not None and bytes(raw['magic'])[:3] in (b'n+1', b'ni1', b'n+2', b'ni2'):
      _check_nifti_header(raw)       # our words for a field nibabel refused (scl_inter)
      _check_vox_offset(raw)         # (a vox_offset of 1..351)
    raise RejectedScan(f'not a readable NIfTI: {type(e).__name__}: {e}') from e
  raw = _raw_nifti_header(path, type(img.header))
  _check_nifti_header(raw)
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
  offset = int(img.dataobj.offset)
  if path.lower().endswith('.gz'):
    _check_size(what, memory, max_bytes, voxels * dtype.itemsize, compressed_bytes=size)
  else:
    _check_size(what, memory, max_bytes, voxels * dtype.itemsize, file_bytes=size - offset)
  _check_vox_offset(raw)               # after the size checks: they say more of a forged header
  if not path.lower().endswith('.gz'):
    _check_nifti_end(what, size, offset, voxels * dtype.itemsize)
  if not np.isfinite(img.affine).all():
    raise RejectedScan(f'affine {img.affine[:3].tolist()} is not finite (NaN pixdim or '
                       'sform/qform); expected real voxel geometry')
  repaired = _nifti_pixdim_repair(raw, img)
  header_repairs, header_warnings, said = _nifti_header_fixes(raw, repaired is not None)
  if path.lower().endswith('.gz'):
    img = _whole_gzip(path, img, offset, voxels * dtype.itemsize, what)
  source_axcodes = ''.join(str(c) for c in nib.orientations.aff2axcodes(img.affine))
  assumed = []
  if int(raw['qform_code']) == 0 and int(raw['sform_code']) == 0:
    # nibabel then builds the affine from pixdim alone with x flipped (Analyze's radiological
    # convention): the RAS axes stored, left / right included, rest on that convention.
    assumed.append(f'NIfTI qform_code 0 and sform_code 0 (no qform / sform): orientation assumed '
                   f'from pixdim alone (nibabel\'s default affine: voxel axes {source_axcodes})')
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
  if assumed:
    attrs['geometry_assumed'] = assumed
  if header_repairs:
    attrs['header_repaired'] = header_repairs
  if header_warnings:
    attrs['header_warnings'] = header_warnings
  return data[None], attrs, said


def _check_nifti_end(what: str, size: int, offset: int, payload: int, holds: str = 'the file'):
  """RejectedScan when a NIfTI (`size` bytes uncompressed; `holds` names them) holds more than its
  header describes: vox_offset + the voxel bytes of dim x datatype. A file ends with its voxels;
  bytes after them mean the header describes less than the file holds (a dim edited, two files
  joined), and reading the first part alone would drop the rest unsaid. Fewer bytes are
  `_check_size`'s reject (a .nii.gz's: `_whole_gzip`'s)."""
  if size > offset + payload:
    raise RejectedScan(f'{what}: {holds} holds {size:,} bytes, {size - offset - payload:,} more '
                       f'than the header describes (vox_offset {offset:,} + {payload:,} bytes of '
                       'voxels); expected a file that ends with its voxels (a dim edited, or two '
                       'files joined?)')


def _whole_gzip(path: str, img, offset: int, payload: int, what: str):
  """`img` (a .nii.gz's header: voxels of `payload` bytes from `offset`) read from the whole gzip
  stream: gzip's CRC-32 and length of each member are checked only at its end, which a reader
  stopping after the voxels never reaches, so a corrupted byte would be stored as wrong voxels.
  The stream's length is checked as an uncompressed file's size is (`_check_nifti_end`)."""
  needed = offset + payload
  try:
    with gzip.open(path, 'rb') as f:
      raw = f.read(needed)
      size = len(raw)
      while chunk := f.read(1 << 24):  # to the end: the trailers are checked there
        size += len(chunk)
  except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
    raise RejectedScan(f'cannot read voxel data: {type(e).__name__}: {e}; expected an intact '
                       'gzip file (gzip -t tests one)') from e
  if len(raw) < needed:
    raise RejectedScan(f'the gzip stream holds {len(raw)} bytes; the header claims {needed} '
                       '(data offset + voxels)')
  _check_nifti_end(what, size, offset, payload, 'the decompressed gzip stream')
  try:
    return type(img).from_bytes(raw)
  except Exception as e:  # nibabel's own check of what it reads again (WrapStructError, ...)
    raise RejectedScan(f'cannot read the NIfTI from its gzip stream: {type(e).__name__}: {e}; '
                       f'expected a header and {payload:,} bytes of voxels from vox_offset '
                       f'{offset:,}') from e


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


# The numeric header fields the reader uses (`_sort_slices`, `_dicom_to_ras`, `_dicom_pixel_bytes`)
# and how many values each holds. pydicom converts a field when it is first read, and a malformed
# one ('0.7x' in a DS) raised a ValueError that named neither the file nor the field.
_DICOM_NUMBERS = {'PixelSpacing': 2, 'ImagePositionPatient': 3, 'ImageOrientationPatient': 6,
                  'SliceThickness': 1, 'InstanceNumber': 1, 'NumberOfFrames': 1}


def _check_dicom_numbers(ds, name: str):
  """RejectedScan naming the file and the field when a field of `_DICOM_NUMBERS` present in `ds`
  (and not empty) is not that many finite numbers."""
  for field, count in _DICOM_NUMBERS.items():
    if field not in ds:
      continue
    try:
      value = ds[field].value
    except (ValueError, TypeError, OverflowError):
      value = ds.get_item(field).value         # still the raw bytes: conversion failed
    if value is None or value == '' or value == b'':
      continue
    values = list(value) if _multi(value) else [value]
    text = '\\'.join(v.decode('latin-1') if isinstance(v, bytes) else str(v) for v in values)
    try:
      numbers = [float(v) for v in text.split('\\')]
      ok = len(numbers) == count and all(math.isfinite(v) for v in numbers)
    except ValueError:
      ok = False
    if not ok:
      raise RejectedScan(f'{name}: {field} "{text.strip()}": expected {count} finite '
                         f'number{"s" if count > 1 else ""}' + (' separated by \\' if count > 1
                                                                 else ''))


def _multi(value) -> bool:
  """Whether a pydicom value holds several values (a MultiValue, a list)."""
  return not isinstance(value, (str, bytes)) and hasattr(value, '__len__')


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
    to_storable(out)               # float32 must hold every value (never inf)
  except ValueError as e:
    raise RejectedScan(f'RescaleSlope {slope:g} / RescaleIntercept {intercept:g}: {e}') from None
  # Kept float64: `_validate` casts the whole scan to float32 and warns where that rounding is
  # coarse against the scan's range (`_float32_rounding`: a large intercept such as 1e9).
  return out


def _rescales(ds) -> bool:
  """Whether `_rescale` keeps this file's pixels as float64 values (8 bytes each) until the scan
  is cast: a slope or intercept that is not an integer (integral ones give int16 CT values)."""
  try:
    values = (_dicom_value(ds, 'RescaleSlope', 1.0), _dicom_value(ds, 'RescaleIntercept', 0.0))
  except RejectedScan:
    return False                   # `_rescale` rejects it, in the same words
  return any(v != int(v) for v in values)


def _dicom_pixel_bytes(ds, name: str, max_bytes: int) -> int:
  """Checks one DICOM file's pixel header against its pixel data (before `pixel_array`
  allocates); returns the bytes decoding it needs."""
  rows, cols = int(getattr(ds, 'Rows', 0) or 0), int(getattr(ds, 'Columns', 0) or 0)
  frames = int(getattr(ds, 'NumberOfFrames', 1) or 1)
  samples = int(getattr(ds, 'SamplesPerPixel', 1) or 1)
  bits = int(getattr(ds, 'BitsAllocated', 8) or 8)
  pixels = rows * cols * frames * samples
  memory = pixels * max(1, -(-bits // 8))
  if _rescales(ds):
    memory += pixels * 8           # its float64 values, held until the scan is cast
  payload, file_bytes = None, None
  meta = getattr(ds, 'file_meta', None)
  syntax = getattr(meta, 'TransferSyntaxUID', None) if meta is not None else None
  if 'PixelData' in ds and (syntax is None or not syntax.is_compressed):
    payload, file_bytes = -(-pixels * bits // 8), len(ds.PixelData)
  _check_size(f'DICOM {name} ({rows} x {cols} x {frames} frames x {samples} samples, {bits} '
              'bits)', memory, max_bytes, payload, file_bytes=file_bytes)
  return memory


def _dicom_to_ras(volume: np.ndarray, slices: list, positions,
                  pixel_spacing: list[float]) -> tuple[np.ndarray, list, str]:
  """[rows, cols, slices] in the DICOM patient frame (LPS) -> RAS axis order, spacing, codes.
  `pixel_spacing`: the series' [row, column] spacing (`_pixel_spacing`, or 1.0 assumed)."""
  import nibabel as nib
  iop = np.asarray(slices[0].ImageOrientationPatient, float)
  x_dir, y_dir = iop[:3], iop[3:]     # x_dir: along a row (column index), y_dir: down rows
  row_sp, col_sp = pixel_spacing
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
  """The files of a DICOM input: the file itself, or a folder's non-hidden files in name order.
  RejectedScan when the folder holds a folder (its files would be neither read nor left out
  knowingly: one series per folder)."""
  if not os.path.isdir(path):
    return [path]
  files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if not f.startswith('.')]
  for f in files:
    if os.path.isdir(f):
      raise RejectedScan(f'{os.path.basename(f)}/ is a folder inside the DICOM series folder; '
                         'expected only the files of one series (give each series its own '
                         'folder)')
  return files


def _sort_slices(slices: list) -> bool:
  """Sorts a series' (dataset, pixels) along the slice normal (ImagePositionPatient), or by
  InstanceNumber when no slice has patient geometry (returns whether they have it). RejectedScan
  when the order or the spacing cannot be trusted: geometry on some slices only, slices of
  different orientations, two at one position, uneven gaps (a missing slice), or no geometry and
  no distinct, consecutive InstanceNumbers (a gap: a missing slice)."""
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
    if len(slices) == 1:
      return False
    order = sorted(range(len(slices)), key=lambda i: int(numbers[i]))
    slices[:] = [slices[i] for i in order]
    # Without positions only the numbering tells that a slice is missing: a gap would join the
    # slices on either side of it as neighbours.
    for a, b in zip(order, order[1:]):
      if int(numbers[b]) - int(numbers[a]) != 1:
        raise RejectedScan(f'InstanceNumber {int(numbers[a])} ({names[a]}) is followed by '
                           f'{int(numbers[b])} ({names[b]}) in slices without patient geometry '
                           '(a missing slice?); expected consecutive InstanceNumbers, one file '
                           'per slice')
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


_MONOCHROME = ('MONOCHROME1', 'MONOCHROME2')
_PALETTE = 'PALETTE COLOR'


def _photometric(ds, name: str) -> str:
  """A DICOM file's PhotometricInterpretation, or RejectedScan when it is absent, or other than
  MONOCHROME1 / MONOCHROME2 for one sample per pixel (palette indices or another colour model
  stored as grey values would be wrong values)."""
  value = str(getattr(ds, 'PhotometricInterpretation', '') or '').strip()
  samples = int(getattr(ds, 'SamplesPerPixel', 1) or 1)
  if not value:
    raise RejectedScan(f'{name}: no PhotometricInterpretation; expected MONOCHROME1 or '
                       'MONOCHROME2 (or RGB with 3 samples per pixel)')
  if samples == 1 and value not in _MONOCHROME + (_PALETTE,):
    raise RejectedScan(f'{name}: PhotometricInterpretation {value} with SamplesPerPixel 1; '
                       'expected MONOCHROME1, MONOCHROME2 or PALETTE COLOR (another colour model '
                       'is not read as grey values)')
  return value


def _palette_rgb(ds, pixels: np.ndarray, name: str, max_bytes: int) -> np.ndarray:
  """A PALETTE COLOR image's indices [rows, cols] through its colour lookup tables -> [3, rows,
  cols, 1] RGB in the tables' own integer type (pydicom's `apply_color_lut`: 8- or 16-bit
  entries, none scaled), as an RGB DICOM is stored. RejectedScan for a palette series or
  multi-frame file, or when the RGB copy would pass `max_bytes`."""
  from pydicom.pixels import apply_color_lut
  if pixels.ndim != 2:
    raise RejectedScan(f'{name}: a PALETTE COLOR DICOM of shape {list(pixels.shape)}; expected one '
                       'palette image per file, not a series or multi-frame file')
  _check_size(name, 3 * pixels.size * 2, max_bytes)     # the tables' entries: at most 16 bits
  try:
    rgb = apply_color_lut(pixels, ds)
  except Exception as e:
    raise RejectedScan(f'{name}: PALETTE COLOR lookup tables unreadable ({type(e).__name__}: '
                       f'{e}); expected the red, green and blue palette tables of the image') from e
  return np.moveaxis(np.asarray(rgb), -1, 0)[..., None]


def _as_monochrome2(array: np.ndarray, attrs: dict) -> np.ndarray:
  """A MONOCHROME1 scan (attrs['photometric_interpretation']; its lowest value is displayed
  white) inverted so that higher values are brighter, as MONOCHROME2 and every other scan:
  x' = min + max - x, computed in int64 / float64 and stored in the array's own dtype (x' stays
  within [min, max]: nothing is narrowed). Recorded as a repair: attribute `monochrome1_inverted`
  = [min, max]. Any other array is returned as it is."""
  if attrs.get('photometric_interpretation') != 'MONOCHROME1':
    return array
  lo, hi = array.min(), array.max()
  wide = np.float64 if array.dtype.kind == 'f' else np.int64
  total = wide(lo) + wide(hi)
  out = np.empty_like(array)
  for k in range(array.shape[-1]):     # a slice at a time: bounded memory
    out[..., k] = np.clip(total - array[..., k].astype(wide), lo, hi).astype(array.dtype)
  attrs['monochrome1_inverted'] = [lo.item(), hi.item()]
  return out


def read_dicom(path: str, max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> tuple[np.ndarray, dict]:
  """What pydicom warns of while reading it (excess pixel-data padding it removes, a value that
  breaks its VR's rules) becomes the attribute `dicom_warnings`, not stderr lines."""
  _quiet_warnings()
  with _logged_lines('pydicom') as lines:
    array, attrs = _read_dicom(path, max_bytes)
  if lines:
    attrs['dicom_warnings'] = list(dict.fromkeys(lines))
  return array, attrs


def _read_dicom(path: str, max_bytes: int) -> tuple[np.ndarray, dict]:
  import pydicom
  files = dicom_files(path)
  if not files:
    raise RejectedScan('empty DICOM folder')
  slices, memory, photometric = [], 0, []
  for f in files:
    try:
      ds = pydicom.dcmread(f)          # holds at most the file's bytes
    except pydicom.errors.InvalidDicomError:
      raise RejectedScan(f'unreadable DICOM {os.path.basename(f)}: not a DICOM file (no "DICM" '
                         'marker after a 128-byte preamble); expected the DICOM files of one '
                         'series') from None
    except Exception as e:
      raise RejectedScan(f'unreadable DICOM {os.path.basename(f)}: {type(e).__name__}: {e}') from e
    if not any(k in ds for k in ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')):
      raise RejectedScan(f'unreadable DICOM {os.path.basename(f)}: no pixel data (PixelData); '
                         'expected the image files of one series')
    _check_dicom_numbers(ds, os.path.basename(f))
    photometric.append(_photometric(ds, os.path.basename(f)))
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
  names = [os.path.basename(f) for f in files]
  for name, value in zip(names, photometric):
    if value != photometric[0]:
      raise RejectedScan(f'{name}: PhotometricInterpretation {value} where {names[0]} has '
                         f'{photometric[0]}; expected one for the series')
  pixel_spacing = _pixel_spacing([ds for ds, _ in slices], names)
  # Without PixelSpacing a volume's row / column spacing is 1.0 mm by assumption: recorded
  # (`geometry_assumed`). A 2D image without it (an X-ray) is a picture of unknown pixel size,
  # 1.0 as for a PNG (store.py).
  row_col, assumed = pixel_spacing or [1.0, 1.0], []
  no_spacing = 'PixelSpacing in no file: row and column spacing assumed 1.0 mm'
  ds0, px0 = slices[0]
  modality = str(getattr(ds0, 'Modality', '') or '')
  attrs = {'modality': modality, 'source_dtype': str(px0.dtype),
           'photometric_interpretation': photometric[0]}
  samples_per_pixel = int(getattr(ds0, 'SamplesPerPixel', 1) or 1)
  if 'PerFrameFunctionalGroupsSequence' in ds0 or 'SharedFunctionalGroupsSequence' in ds0:
    raise RejectedScan('an enhanced multi-frame DICOM (its rescale and geometry are in '
                       'functional groups, which this reader does not apply); expected classic '
                       'single-frame slices or a NIfTI (dcm2niix converts either)')
  if photometric[0] == _PALETTE:
    if len(slices) != 1:
      raise RejectedScan(f'a PALETTE COLOR series of {len(slices)} files; expected one palette '
                         'image per file')
    attrs['palette_applied'] = True
    attrs['spacing'] = row_col + [1.0]
    return _palette_rgb(ds0, px0, names[0], max_bytes - memory), attrs
  if len(slices) == 1 and (samples_per_pixel == 3 or px0.ndim == 3):
    # Colour image [rows, cols, 3] or a multi-frame volume [frames, rows, cols].
    attrs['spacing'] = row_col + [1.0]
    if samples_per_pixel == 3:
      if px0.ndim != 3:
        raise RejectedScan(f'a multi-frame colour DICOM ({px0.shape[0]} frames); expected one '
                           'colour image per file')
      array = np.moveaxis(px0[..., :3], -1, 0)[..., None]
    else:
      array = _as_monochrome2(np.moveaxis(_rescale(ds0, px0), 0, -1)[None], attrs)
      # A classic multi-frame file has no position per frame: the frames' spacing is unknown.
      assumed = ([no_spacing] if pixel_spacing is None else []) + [
          f'a multi-frame file of {px0.shape[0]} frames without a position per frame: spacing '
          'between frames assumed 1.0 mm']
      attrs['geometry_assumed'] = assumed
    return array, attrs
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
  volume = _as_monochrome2(volume, attrs)
  if pixel_spacing is None and (has_geometry or len(slices) > 1):
    assumed.append(no_spacing)
  if has_geometry:
    positions = [np.asarray(ds.ImagePositionPatient, float) for ds, _ in slices]
    volume, spacing, source = _dicom_to_ras(volume, [ds for ds, _ in slices], positions, row_col)
    attrs.update(spacing=spacing, orientation='RAS', source_orientation=source)
  else:
    attrs['spacing'] = row_col + [1.0]
    if len(slices) > 1:
      assumed.append(f'no ImagePositionPatient / ImageOrientationPatient: {len(slices)} slices in '
                     'InstanceNumber order, spacing between slices assumed 1.0 mm')
  if assumed:
    attrs['geometry_assumed'] = assumed
  return volume[None], attrs


def _pixel_spacing(datasets: list, names: list[str]) -> list[float] | None:
  """The series' PixelSpacing [row, column] in mm (None when no file has one), or RejectedScan
  naming the file and field: a value that is not positive, or one file's value (or its lack of
  one) unlike the first file's. A series is stored with one spacing, so a file of another pixel
  size would be stored with a spacing that is not its own."""
  values = []
  for ds, name in zip(datasets, names):
    raw = ds.get('PixelSpacing', None)
    value = [float(v) for v in raw] if raw else None         # an empty value: none
    if value is not None and not all(v > 0 for v in value):   # finite: _check_dicom_numbers
      raise RejectedScan(f'{name}: PixelSpacing {value}: a spacing that is not finite and '
                         'positive; expected the real pixel size in mm')
    values.append(value)
  said = ['no PixelSpacing' if v is None else f'PixelSpacing {v}' for v in values]
  for name, value, text in zip(names[1:], values[1:], said[1:]):
    if (value is None) != (values[0] is None) or (
        value is not None and not np.allclose(value, values[0], rtol=1e-4, atol=0)):
      raise RejectedScan(f'{name}: {text} where {names[0]} has {said[0]}; expected one pixel '
                         'spacing for the series')
  return values[0]


_PIL_BYTES = {'I;16': 2, 'I;16B': 2, 'I;16L': 2, 'I;16N': 2, 'I': 4, 'F': 4}
# Pillow modes stored as they are (one channel, the values and dtype Pillow gives: uint8, uint16,
# int32), and those turned into 8-bit RGB by `convert('RGB')`, as the original RadFM loads every
# 2D image: without changing a value (bilevel, palette colours, RGB padding), from another colour
# space of 8-bit samples (CMYK, YCbCr, LAB, HSV: the image_mode attribute says which), or with an
# alpha channel dropped (its RGB kept as the original keeps it; transparent pixels are a warning,
# `image_warnings`). Any other mode (F: float, a 32-bit or 16-bit colour mode) would be
# narrowed: a reject.
_PIL_GRAY = ('L', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
_PIL_RGB = ('RGB', 'RGBX', 'P', '1', 'CMYK', 'YCbCr', 'LAB', 'HSV')
_PIL_ALPHA = ('RGBA', 'RGBa', 'LA', 'PA')


def _png_16bit_with_channels(path: str) -> bool:
  """Whether a PNG's IHDR chunk says 16 bits per sample in a colour type other than 0 (grey):
  Pillow keeps 16 bits for grey only."""
  with open(path, 'rb') as f:
    head = f.read(26)
  return len(head) == 26 and head[24] == 16 and head[25] != 0


def read_image(path: str, max_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> tuple[np.ndarray, dict]:
  """A PNG / JPEG (whatever Pillow finds in the file) -> [C, H, W, 1]: grey modes as they are,
  8-bit colour modes as 8-bit RGB (`_PIL_RGB`, `_PIL_ALPHA`); any other mode is a reject.
  Pillow's warnings are not printed (`_caught_warnings`): its DecompressionBombWarning is left to
  our own size checks, which reject or pass the scan; any other becomes the attribute
  `image_warnings` of a stored image."""
  with _caught_warnings() as caught:
    array, attrs = _read_image(path, max_bytes)
  bomb = 'DecompressionBombWarning: '
  said = [w for w in dict.fromkeys(caught) if not w.startswith(bomb)]
  if said:
    attrs['image_warnings'] = attrs.get('image_warnings', []) + said
  return array, attrs


def _read_image(path: str, max_bytes: int) -> tuple[np.ndarray, dict]:
  from PIL import Image
  try:
    with Image.open(path) as img:    # reads the header only
      mode, (width, height) = img.mode, img.size
      if mode not in _PIL_GRAY + _PIL_RGB + _PIL_ALPHA:
        raise RejectedScan(f'a {img.format} image of Pillow mode {mode} (bands '
                           f'{"".join(img.getbands())}), which conversion to 8-bit RGB would '
                           'narrow; expected 8-bit grey or colour (L, RGB, P, CMYK, ...), 16-bit '
                           'grey (I;16) or 32-bit integer grey (I), or a .npy of the values')
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
      dropped = None
      if mode in _PIL_ALPHA or ('transparency' in img.info and mode in ('L', 'P', 'RGB')):
        dropped = _transparency(img, mode)
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
  attrs = {'source_dtype': str(array.dtype), 'image_mode': mode}
  if dropped:
    attrs['image_warnings'] = [dropped]
  return array[..., None], attrs


def _transparency(img, mode: str) -> str | None:
  """The warning for an image with an alpha channel (or a palette / colour marked transparent)
  that has pixels that are not opaque, whose transparency its conversion to RGB drops (the RGB
  under them kept, as the original's `convert('RGB')` keeps it); None when every pixel is
  opaque."""
  alpha = np.asarray(img.convert('RGBA').getchannel('A'))
  if alpha.min() == 255:
    return None
  return (f'Pillow mode {mode}: {int((alpha < 255).sum()):,} pixels not opaque (alpha '
          f'{alpha.min()} to {alpha.max()}); the transparency dropped, their RGB values kept, as '
          "the original's convert('RGB') keeps them")


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
    result.append((_validate(array, attrs), attrs))
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
