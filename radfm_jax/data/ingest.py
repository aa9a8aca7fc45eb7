"""`radfm-jax ingest`: scans (NIfTI, DICOM, PNG/JPEG, .npy) + a sample manifest -> a VolumeStore.

    radfm-jax ingest --manifest samples.jsonl --out STORE [--strict]
    report = ingest('samples.jsonl', 'STORE')            # or a list of record dicts

Input manifest (JSONL, one training sample per line; every field: docs/data.md and
data/manifest.py, which validates each line before anything is read):

    {"id": "s1", "task": "vqa", "question": "What is shown?", "answer": "A nodule.",
     "images": [{"path": "ct/case1.nii.gz", "position": {"question": 0}, "modality": "CT"}]}

Image entries take `path` (relative paths resolve against the manifest's folder or `root`) and
optional `id` (scan id; default a hash of path/frame/index), `modality`, `frame` (which volume of
a 4D NIfTI), `index` (which image of a 5D RadFM case .npy [S, C, H, W, D]; without it all S
images are used, each at the entry's position). Other sample keys pass through unchanged.

Reading rules (stored layout [C, H, W, D], see store.py):
  * NIfTI: reoriented to RAS with `nib.as_closest_canonical`; 4D: trailing singleton axes are
    squeezed, a real time/echo axis needs `frame`, otherwise the scan is rejected (no silent
    averaging or first-frame pick). Rank > 4 after squeezing is rejected.
  * DICOM: a file or a folder holding one series; slices are sorted by position along the slice
    normal (ImagePositionPatient), else InstanceNumber; RescaleSlope/Intercept applied (stored
    int16 when the result is integral and fits, e.g. CT HU); volumes with orientation tags are
    reoriented LPS -> RAS like NIfTI; a file without them (X-ray) is a 2D image.
  * PNG/JPEG: Pillow; grayscale stays 1 channel (16-bit kept), everything else becomes RGB.
  * .npy: [H, W] / [H, W, D] / [C, H, W, D] (C in 1, 3) / [S, C, H, W, D]; other ranks rejected.
A scan is rejected (path, reason -> rejects.jsonl and stderr) when it cannot be read, has a
wrong rank, is empty, holds any NaN/inf, or is constant. A sample with any rejected image is left
out of the output manifest (its text may refer to the missing image). Nothing of a rejected scan
reaches the store: arrays are validated in memory before the write transaction.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
from typing import Iterable

import numpy as np

from radfm_jax.data.store import VolumeStore, write_jsonl


class IngestError(RuntimeError):
  """Raised by `ingest(..., strict=True)` when any input was rejected."""


class RejectedScan(ValueError):
  """An input that cannot become a stored scan; the message is the reason."""


@dataclasses.dataclass
class IngestReport:
  stored: list[str] = dataclasses.field(default_factory=list)     # scan ids written this run
  skipped: list[str] = dataclasses.field(default_factory=list)    # already in the store
  rejects: list[dict] = dataclasses.field(default_factory=list)   # {'path', 'reason', ...}
  samples: int = 0                                                # manifest records written
  dropped_samples: int = 0

  def summary(self) -> str:
    return (f'{len(self.stored)} scans stored, {len(self.skipped)} already stored, '
            f'{len(self.rejects)} rejected; {self.samples} samples in manifest, '
            f'{self.dropped_samples} dropped')


# ------------------------------------------------------------------------------------------------
# Readers: path -> list of (array [C, H, W, D], attributes)


def _validate(array: np.ndarray) -> np.ndarray:
  if array.ndim != 4:
    raise RejectedScan(f'wrong rank: shape {array.shape}')
  if array.size == 0:
    raise RejectedScan(f'empty array: shape {array.shape}')
  if array.dtype.kind == 'f':
    finite = np.isfinite(array)
    if not finite.any():
      raise RejectedScan('all values are NaN/inf')
    if not finite.all():
      raise RejectedScan(f'{int((~finite).sum())} NaN/inf values')
  elif array.dtype.kind not in 'iub':
    raise RejectedScan(f'unsupported dtype {array.dtype}')
  if array.min() == array.max():
    raise RejectedScan(f'constant volume (every value {array.flat[0]!r})')
  return array


def read_nifti(path: str, frame: int | None = None) -> tuple[np.ndarray, dict]:
  import nibabel as nib
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for non-NIfTI content
    raise RejectedScan(f'not a readable NIfTI: {type(e).__name__}: {e}') from e
  source_axcodes = ''.join(nib.orientations.aff2axcodes(img.affine))
  img = nib.as_closest_canonical(img)
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # truncated gzip: EOFError / zlib.error; short file: OSError
    raise RejectedScan(f'cannot read voxel data: {type(e).__name__}: {e}') from e
  source_dtype = str(img.get_data_dtype())
  zooms = [float(z) for z in img.header.get_zooms()[:3]]
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
  zooms = (zooms + [1.0] * 3)[:3]
  attrs = {'spacing': zooms, 'orientation': 'RAS', 'source_orientation': source_axcodes,
           'source_dtype': source_dtype}
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
  return out.astype(np.float32)


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
  spacing = [row_sp, col_sp, float(np.linalg.norm(step))]
  source = ''.join(nib.orientations.aff2axcodes(affine))
  ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                         nib.orientations.axcodes2ornt('RAS'))
  out = nib.orientations.apply_orientation(volume, ornt)
  ras_spacing = [0.0] * 3
  for axis, (new_axis, _) in enumerate(ornt):
    ras_spacing[int(new_axis)] = spacing[axis]
  return np.ascontiguousarray(out), ras_spacing, source


def read_dicom(path: str) -> tuple[np.ndarray, dict]:
  import pydicom
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if not f.startswith('.')]
           if os.path.isdir(path) else [path])
  if not files:
    raise RejectedScan('empty DICOM folder')
  slices = []
  for f in files:
    try:
      ds = pydicom.dcmread(f)
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


def read_image(path: str) -> tuple[np.ndarray, dict]:
  from PIL import Image
  try:
    with Image.open(path) as img:
      img.load()
      mode = img.mode
      if mode in ('L', 'I;16', 'I;16B', 'I'):
        array = np.asarray(img)[None]
      else:
        array = np.moveaxis(np.asarray(img.convert('RGB')), -1, 0)
  except Exception as e:
    raise RejectedScan(f'not a readable image: {type(e).__name__}: {e}') from e
  return array[..., None], {'source_dtype': str(array.dtype), 'image_mode': mode}


def read_npy(path: str, index: int | None = None) -> list[tuple[np.ndarray, dict]]:
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


def read_scan(path: str, entry: dict | None = None) -> list[tuple[np.ndarray, dict]]:
  """One manifest image entry -> validated [(array [C, H, W, D], attributes)]."""
  entry = entry or {}
  if not os.path.exists(path):
    raise RejectedScan('file not found')
  lower = path.lower()
  if lower.endswith(('.nii', '.nii.gz')):
    out = [read_nifti(path, entry.get('frame'))]
  elif lower.endswith('.npy'):
    out = read_npy(path, entry.get('index'))
  elif lower.endswith(('.png', '.jpg', '.jpeg')):
    out = [read_image(path)]
  elif os.path.isdir(path) or lower.endswith(('.dcm', '.dicom')):
    out = [read_dicom(path)]
  else:
    raise RejectedScan('unsupported file type (expected .nii[.gz], .dcm or a DICOM folder, '
                       '.png, .jpg/.jpeg, .npy)')
  result = []
  for array, attrs in out:
    attrs = dict(attrs, source=os.path.abspath(path))
    if entry.get('modality'):
      attrs['modality'] = entry['modality']
    attrs.setdefault('modality', '')
    attrs.setdefault('spacing', [1.0, 1.0, 1.0])
    # Without patient geometry: 'image' = H pixel rows, W columns (PNG/JPEG, X-ray DICOM);
    # 'as_stored' = a .npy taken as given.
    attrs.setdefault('orientation', 'as_stored' if lower.endswith('.npy') else 'image')
    result.append((_validate(array), attrs))
  return result


# ------------------------------------------------------------------------------------------------
# Driver


def scan_id_for(path: str, entry: dict) -> str:
  if entry.get('id'):
    return str(entry['id'])
  key = json.dumps([os.path.abspath(path), entry.get('frame'), entry.get('index')])
  return hashlib.sha1(key.encode()).hexdigest()[:20]


def _load_records(manifest) -> tuple[list[dict], str]:
  """Validated input records (data/manifest.py: an InputError names file, line and field) and the
  folder relative image paths start from."""
  from radfm_jax.data.manifest import read_records, validate_records
  if isinstance(manifest, (str, os.PathLike)):
    return read_records(manifest, form='input'), os.path.dirname(os.path.abspath(manifest))
  return validate_records(manifest, form='input'), os.getcwd()


def _expand_ids(scan_id: str, n: int) -> list[str]:
  return [scan_id] if n == 1 else [f'{scan_id}_{s}' for s in range(n)]


def ingest(manifest: str | Iterable[dict], out_dir: str, strict: bool = False,
           root: str | None = None, batch_size: int = 16, workers: int | None = None,
           log=None) -> IngestReport:
  """Reads every image of every sample once into `out_dir` and writes the sample manifest.

  Returns an IngestReport; with `strict`, raises IngestError after writing everything that was
  readable (rejects.jsonl lists all failures, so one run shows every problem). Progress goes to
  `log` (default: sys.stderr as it is at call time, not at import).
  """
  log = log or sys.stderr
  records, base = _load_records(manifest)
  base = root or base
  store = VolumeStore(out_dir)
  os.makedirs(store.root, exist_ok=True)
  report = IngestReport()

  # Unique image entries in first-seen order (several samples may share one scan).
  entries: dict[str, tuple[str, dict]] = {}
  for rec in records:
    for entry in rec.get('images', []):
      path = os.path.join(base, entry['path'])
      entries.setdefault(scan_id_for(path, entry), (path, entry))

  resolved: dict[str, list[str] | None] = {}   # entry id -> stored scan ids, None if rejected
  todo = []
  for sid, (path, entry) in entries.items():
    existing = [sid] if sid in store else []
    while f'{sid}_{len(existing)}' in store:   # a 5D case .npy expanded to sid_0, sid_1, ...
      existing.append(f'{sid}_{len(existing)}')
    if existing:
      resolved[sid] = existing
      report.skipped.extend(existing)
    else:
      todo.append(sid)

  def load(sid):
    path, entry = entries[sid]
    try:
      return sid, read_scan(path, entry), None
    except RejectedScan as e:
      return sid, None, str(e)
    except Exception as e:  # any reader bug still must not stop the run
      return sid, None, f'{type(e).__name__}: {e}'

  pending: list[tuple[str, np.ndarray, dict]] = []

  def flush():
    if pending:
      report.stored.extend(r['id'] for r in store.write_batch(pending))
      pending.clear()

  # Read `batch_size` scans at a time (threads: gzip/zstd/pydicom release the GIL), write them in
  # one transaction, then read the next: memory stays bounded by one batch of decoded volumes.
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    for start in range(0, len(todo), batch_size):
      for sid, scans, reason in pool.map(load, todo[start:start + batch_size]):
        path = entries[sid][0]
        if reason is not None:
          resolved[sid] = None
          report.rejects.append({'path': path, 'scan_id': sid, 'reason': reason})
          print(f'ingest: rejected {path}: {reason}', file=log)
          continue
        ids = _expand_ids(sid, len(scans))
        resolved[sid] = ids
        pending.extend((i, a, attrs) for i, (a, attrs) in zip(ids, scans))
      flush()

  index = store.index()
  samples = []
  for n, rec in enumerate(records):
    images, bad = [], None
    for entry in rec.get('images', []):
      path = os.path.join(base, entry['path'])
      ids = resolved[scan_id_for(path, entry)]
      if ids is None:
        bad = path
        break
      for i in ids:
        images.append({'id': i, 'position': entry.get('position', {'question': 0}),
                       'shape': index[i]['shape'], 'modality': index[i]['attributes']['modality']})
    if bad is not None:
      report.dropped_samples += 1
      report.rejects.append({'path': bad, 'sample_id': rec.get('id', n),
                             'reason': 'sample dropped: one of its images was rejected'})
      continue
    out = {k: v for k, v in rec.items() if k != 'images'}
    out.setdefault('id', str(n))
    out.setdefault('question', '')
    out.setdefault('answer', '')
    out.setdefault('task', '')
    out['images'] = images
    samples.append(out)
  write_jsonl(store.manifest_path, samples)
  write_jsonl(store.rejects_path, report.rejects)
  report.samples = len(samples)
  print(f'ingest: {report.summary()} -> {store.root}', file=log)
  if strict and report.rejects:
    raise IngestError(f'{len(report.rejects)} inputs rejected (see {store.rejects_path})')
  return report
