"""The embedded demo dataset: real scans shipped inside PyPI packages + 3D phantoms with known findings.

    info = build_demo_dataset('demo_out/data', seed=0)       # writes scans/, samples.jsonl
    report = ingest('demo_out/data/samples.jsonl', 'demo_out/store')

Two families of samples, each with a `train` and a `heldout` split (`split` field of the record):

* **Real scans** (`family: real`). Every source file found inside an installed package
  (`REAL_SOURCES`: pydicom's test files, pydicom-data's `data_store`, nibabel's test volumes, nilearn's
  MNI152 template) is read once and turned into augmented copies: a random crop (70-100% of every
  axis), a random in-plane flip (2D only), random contrast/gamma and noise, resized to 64 x 64 (2D,
  written as PNG) or 64 x 64 x 16 (3D, written as NIfTI). Questions: imaging modality (CT / MRI /
  X-ray / ultrasound) and body part (head / chest / abdomen / limb, where the source's body part is
  known). Held-out copies are different random augmentations of the same source scans (the sources
  are too few to hold whole scans out), so these numbers measure robustness to crop / contrast, not
  generalisation to new patients.
* **Phantoms** (`family: phantom`). Procedural 64 x 64 x 16 volumes (3 x 3 x 6 mm voxels, RAS):
  uniform soft tissue filling the field of view over a dark table strip and, in half of them, one bright
  spherical lesion on the patient's left or right (H axis = RAS x, index grows towards the patient's
  right), 15-30 mm across. Questions: lesion present (yes / no), lesion side (left / right, only when
  a lesion exists) and a templated report (open). Every phantom, train or held-out, is a fresh random
  volume, so held-out phantom accuracy is true generalisation.

Closed questions record their `options`; chance for a question is 1 / len(options).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import warnings
from typing import Iterable

import numpy as np

from radfm_jax.data import prompts
from radfm_jax.data.store import write_jsonl

MODALITIES = ('CT', 'MRI', 'X-ray', 'ultrasound')
BODY_PARTS = ('head', 'chest', 'abdomen', 'limb')
YES_NO = ('yes', 'no')
SIDES = ('left', 'right')
PHANTOM_SHAPE = (64, 64, 16)
PHANTOM_SPACING = (3.0, 3.0, 6.0)
SIDE_QUESTIONS = ('Which side is the lesion on?', 'On which side of the body is the lesion?',
                  'Is the lesion on the left or the right?', 'Where is the lesion, left or right?')
BODY_QUESTIONS = ('Which body part is shown in this image?', 'What part of the body is imaged?',
                  'Which region of the body does this scan cover?', 'Name the body part shown.')
LESION_FINDINGS = ('a focal lesion', 'a lesion', 'a bright mass', 'a focal abnormality')


@dataclasses.dataclass(frozen=True)
class RealSource:
  """One scan file inside an installed package."""
  name: str
  package: str            # importable name (found with importlib.util.find_spec, not imported)
  path: str               # relative to the package folder
  modality: str           # one of MODALITIES
  body_part: str | None   # one of BODY_PARTS, None when not known
  dims: int               # 2 (an image) or 3 (a volume)
  frame: int | None = None
  pip: str = ''           # the PyPI distribution that ships it


REAL_SOURCES = (
    # pydicom (a core dependency): small CT / MR test images.
    RealSource('ct_small', 'pydicom', 'data/test_files/CT_small.dcm', 'CT', None, 2, pip='pydicom'),
    RealSource('ct_head_j2k', 'pydicom', 'data/test_files/J2K_pixelrep_mismatch.dcm', 'CT', 'head', 2,
               pip='pydicom'),
    RealSource('mr_small', 'pydicom', 'data/test_files/MR_small.dcm', 'MRI', None, 2, pip='pydicom'),
    RealSource('mr_abdomen_overlay', 'pydicom', 'data/test_files/examples_overlay.dcm', 'MRI',
               'abdomen', 2, pip='pydicom'),
    RealSource('us_rgb', 'pydicom', 'data/test_files/examples_rgb_color.dcm', 'ultrasound', None, 2,
               pip='pydicom'),
    # pydicom-data (module `data_store`): larger CT / MR / CR radiographs / ultrasound.
    RealSource('ct_head_693', 'data_store', 'data/693_UNCR.dcm', 'CT', 'head', 2, pip='pydicom-data'),
    RealSource('ct_abdomen', 'data_store', 'data/explicit_VR-UN.dcm', 'CT', 'abdomen', 2,
               pip='pydicom-data'),
    RealSource('ct_head_perfusion', 'data_store', 'data/eCT_Supplemental.dcm', 'CT', 'head', 2, 0,
               pip='pydicom-data'),
    RealSource('mr_shoulder', 'data_store', 'data/MR2_UNCR.dcm', 'MRI', 'limb', 2, pip='pydicom-data'),
    RealSource('mr_abdomen', 'data_store', 'data/MR-SIEMENS-DICOM-WithOverlays.dcm', 'MRI', 'abdomen',
               2, pip='pydicom-data'),
    RealSource('mr_head_multiframe', 'data_store', 'data/emri_small.dcm', 'MRI', 'head', 3,
               pip='pydicom-data'),
    RealSource('xr_chest', 'data_store', 'data/RG1_UNCR.dcm', 'X-ray', 'chest', 2, pip='pydicom-data'),
    RealSource('xr_extremity', 'data_store', 'data/RG3_UNCR.dcm', 'X-ray', 'limb', 2,
               pip='pydicom-data'),
    RealSource('us_abdomen', 'data_store', 'data/US1_UNCR.dcm', 'ultrasound', None, 2,
               pip='pydicom-data'),
    RealSource('us_doppler', 'data_store', 'data/color-px.dcm', 'ultrasound', None, 2,
               pip='pydicom-data'),
    RealSource('us_palette', 'data_store', 'data/OBXXXX1A.dcm', 'ultrasound', None, 2,
               pip='pydicom-data'),
    # nibabel (a core dependency): example MR volumes.
    RealSource('mr_head_anatomical', 'nibabel', 'tests/data/anatomical.nii', 'MRI', 'head', 3,
               pip='nibabel'),
    RealSource('mr_head_epi', 'nibabel', 'tests/data/example4d.nii.gz', 'MRI', 'head', 3, 0,
               pip='nibabel'),
    # nilearn: the MNI152 T1 template ships inside the package (no download).
    RealSource('mr_head_mni152', 'nilearn',
               'datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz', 'MRI', 'head', 3,
               pip='nilearn'),
)


def source_path(src: RealSource) -> str | None:
  """Absolute path of a source file, or None when its package is not installed."""
  spec = importlib.util.find_spec(src.package)
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, src.path)
    if os.path.exists(path):
      return path
  return None


def available_sources() -> tuple[list[tuple[RealSource, str]], list[RealSource]]:
  found, missing = [], []
  for src in REAL_SOURCES:
    path = source_path(src)
    (found.append((src, path)) if path else missing.append(src))
  return found, missing


# ------------------------------------------------------------------------------------------------
# Reading the sources (display-ready float arrays: 2D [H, W] or [H, W, 3], 3D [H, W, D])


def _read_dicom(path: str, frame: int | None) -> np.ndarray:
  import pydicom
  from pydicom.pixels import apply_color_lut, convert_color_space
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    ds = pydicom.dcmread(path)
    px = ds.pixel_array
    photometric = str(getattr(ds, 'PhotometricInterpretation', ''))
    if photometric == 'PALETTE COLOR':
      px = apply_color_lut(px, ds)
    elif photometric.startswith('YBR'):
      px = convert_color_space(px, photometric, 'RGB')
  frames = int(getattr(ds, 'NumberOfFrames', 1) or 1)
  px = px.astype(np.float32)
  if frames > 1:
    px = px[frame] if frame is not None else np.moveaxis(px, 0, -1)     # [H, W, F] volume
  if photometric == 'MONOCHROME1':
    px = px.max() - px
  return px


def _read_nifti(path: str, frame: int | None) -> np.ndarray:
  import nibabel as nib
  img = nib.as_closest_canonical(nib.load(path))
  data = np.asarray(img.dataobj, dtype=np.float32)
  while data.ndim > 3:
    data = data[..., frame or 0]
  return data


def read_source(src: RealSource, path: str) -> np.ndarray:
  lower = path.lower()
  arr = _read_nifti(path, src.frame) if lower.endswith(('.nii', '.nii.gz')) else _read_dicom(
      path, src.frame)
  if src.dims == 2 and arr.ndim == 3 and arr.shape[-1] != 3:
    arr = arr[..., arr.shape[-1] // 2]
  return arr


# ------------------------------------------------------------------------------------------------
# Augmentation


def _resize(x: np.ndarray, shape) -> np.ndarray:
  """Linear resize of the leading len(shape) axes (antialiased by block-averaging big shrinks)."""
  from radfm_jax.data.transforms import resize
  spatial = x.shape[:len(shape)]
  factors = [max(1, n // (2 * m)) for n, m in zip(spatial, shape)]
  if any(f > 1 for f in factors):       # box-filter first so a 1955-pixel X-ray does not alias
    cut = tuple(slice(0, (n // f) * f) for n, f in zip(spatial, factors))
    x = x[cut]
    new = []
    for n, f in zip(x.shape[:len(shape)], factors):
      new += [n // f, f]
    x = x.reshape(new + list(x.shape[len(shape):])).mean(axis=tuple(range(1, 2 * len(shape), 2)))
  chans = x.reshape(x.shape[:len(shape)] + (-1,))                        # [..., C]
  moved = np.moveaxis(chans, -1, 0)
  if len(shape) == 2:
    moved = moved[..., None]
    out = resize(moved, tuple(shape) + (1,), 'trilinear')[..., 0]
  else:
    out = resize(moved, tuple(shape), 'trilinear')
  return np.moveaxis(out, 0, -1).reshape(tuple(shape) + x.shape[len(shape):])


def _random_crop(x: np.ndarray, rng: np.random.Generator, axes: int, low: float = 0.7):
  cut = []
  for n in x.shape[:axes]:
    size = max(2, int(round(n * rng.uniform(low, 1.0))))
    start = int(rng.integers(0, n - size + 1))
    cut.append(slice(start, start + size))
  return x[tuple(cut)]


def _jitter_intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Robust rescale to [0, 1] (random percentile window), random gamma, gaussian noise."""
  lo_p, hi_p = rng.uniform(0.0, 2.0), rng.uniform(98.0, 100.0)
  lo, hi = np.percentile(x, [lo_p, hi_p])
  y = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
  y = y ** rng.uniform(0.7, 1.4)
  y = y + rng.normal(0, rng.uniform(0.0, 0.03), y.shape)
  return np.clip(y, 0, 1).astype(np.float32)


def augment_real(arr: np.ndarray, dims: int, rng: np.random.Generator, size_2d: int = 64,
                 shape_3d=PHANTOM_SHAPE) -> np.ndarray:
  """One augmented copy in [0, 1]: 2D [size, size] or [size, size, 3]; 3D shape_3d."""
  if dims == 2:
    x = _random_crop(arr, rng, 2)
    if rng.random() < 0.5:
      x = x[:, ::-1]
    return _jitter_intensity(_resize(np.ascontiguousarray(x), (size_2d, size_2d)), rng)
  x = _random_crop(arr, rng, 3)
  return _jitter_intensity(_resize(np.ascontiguousarray(x), shape_3d), rng)


# ------------------------------------------------------------------------------------------------
# Phantoms


@dataclasses.dataclass(frozen=True)
class PhantomLabel:
  lesion: bool
  side: str | None          # 'left' / 'right' (patient side) when lesion
  diameter_mm: int | None
  level: str | None         # 'upper' / 'lower' half of the volume (superior / inferior)

  def report(self) -> tuple[str, str]:
    if not self.lesion:
      return ('No focal lesion. The soft tissue is uniform.',
              'Normal study.')
    size = 'small' if self.diameter_mm < 22 else 'large'
    return (f'A {self.diameter_mm} mm bright round lesion in the {self.level} {self.side} side '
            f'of the body.', f'{size.capitalize()} {self.side}-sided lesion.')


def _ellipsoid(shape, center, radii) -> np.ndarray:
  axes = [((np.arange(n, dtype=np.float32) - c) / r) ** 2 for n, c, r in zip(shape, center, radii)]
  return axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]


def make_phantom(rng: np.random.Generator, lesion: bool | None = None, side: str | None = None,
                 shape=PHANTOM_SHAPE) -> tuple[np.ndarray, PhantomLabel]:
  """A float32 volume [H, W, D] in RAS voxel order (H grows towards the patient's right)."""
  h, w, d = shape
  lesion = bool(rng.random() < 0.5) if lesion is None else lesion
  # Uniform soft tissue filling the field of view (no outline, no noise): the ViT LayerNorms every
  # patch, so any edge or noise in a flat patch becomes a unit-variance pattern; this way the only
  # non-blank patches are the lesion's, which a from-scratch model learns in minutes on a CPU.
  center = np.array([h / 2, w / 2, d / 2 - 0.5])
  radii = np.array([h / 2, w / 2, d / 2])
  vol = np.full(shape, rng.uniform(0.3, 0.45), np.float32)
  vol[:, :2, :] = rng.uniform(0.02, 0.08)                     # the scanner table (posterior edge)
  label = PhantomLabel(False, None, None, None)
  if lesion:
    side = side or ('left' if rng.random() < 0.5 else 'right')
    radius_vox = float(rng.uniform(2.5, 5.0))                 # 15-30 mm across at 3 mm voxels
    sign = 1.0 if side == 'right' else -1.0                   # RAS: +x (H index) is the right
    lateral = rng.uniform(radius_vox + 2, max(radius_vox + 3, 0.75 * radii[0] - radius_vox))
    c = np.array([center[0] + sign * lateral,
                  center[1] + rng.uniform(-0.5, 0.5) * radii[1],
                  rng.uniform(3, d - 4)])
    r = np.array([radius_vox, radius_vox, max(radius_vox * PHANTOM_SPACING[0] / PHANTOM_SPACING[2], 1.0)])
    vol[_ellipsoid(shape, c, r) <= 1] = rng.uniform(0.85, 1.0)
    diameter = int(round(2 * radius_vox * PHANTOM_SPACING[0]))
    label = PhantomLabel(True, side, diameter, 'upper' if c[2] >= d / 2 else 'lower')
  return vol, label


# ------------------------------------------------------------------------------------------------
# Writers


def _write_png(path: str, image: np.ndarray):
  from PIL import Image
  data = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  Image.fromarray(data, 'RGB' if data.ndim == 3 else 'L').save(path)


def _write_nifti(path: str, volume: np.ndarray, spacing):
  import nibabel as nib
  data = np.clip(np.round(volume * 1000), -32768, 32767).astype(np.int16)
  img = nib.Nifti1Image(data, np.diag(list(spacing) + [1.0]))
  img.header.set_xyzt_units('mm')
  nib.save(img, path)


# ------------------------------------------------------------------------------------------------
# Samples


def _closed(question: str, answer: str, options: Iterable[str], **extra) -> dict:
  return dict(question=question, answer=answer, kind='closed', options=list(options), **extra)


def _image(path: str, modality: str = '') -> list[dict]:
  return [{'path': path, 'position': {'question': 0}, 'modality': modality}]


def real_samples(src: RealSource, split: str, copy: int, rel: str, rng: random.Random) -> list[dict]:
  """Samples for one augmented copy: the modality question, and body part where known."""
  base = {'split': split, 'family': 'real', 'source': src.name, 'pip': src.pip,
          'images': _image(rel, 'CT' if src.modality == 'CT' else '')}
  out = [dict(base, id=f'{src.name}_{split}_{copy}_modality', task='modality',
              label={'modality': src.modality},
              **_closed(prompts.render_question('modality', rng), src.modality, MODALITIES))]
  if src.body_part:
    out.append(dict(base, id=f'{src.name}_{split}_{copy}_bodypart', task='vqa',
                    label={'body_part': src.body_part},
                    **_closed(rng.choice(BODY_QUESTIONS), src.body_part, BODY_PARTS)))
  return out


def phantom_samples(name: str, split: str, rel: str, label: PhantomLabel, task: str,
                    rng: random.Random) -> list[dict]:
  base = {'split': split, 'family': 'phantom', 'source': 'phantom', 'images': _image(rel),
          'label': dataclasses.asdict(label)}
  if task == 'lesion':
    finding = rng.choice(LESION_FINDINGS)
    q = prompts.render_question('diagnosis_yes_no', rng, finding=finding)
    return [dict(base, id=f'{name}_lesion', task='diagnosis_yes_no',
                 **_closed(q, 'yes' if label.lesion else 'no', YES_NO))]
  if task == 'side':
    return [dict(base, id=f'{name}_side', task='vqa',
                 **_closed(rng.choice(SIDE_QUESTIONS), label.side, SIDES))]
  findings, impression = label.report()
  answer = prompts.load_templates('report')['answer_format'].format(findings=findings,
                                                                    impression=impression)
  return [dict(base, id=f'{name}_report', task='report', kind='open',
               question=prompts.render_question('report', rng), answer=answer)]


@dataclasses.dataclass(frozen=True)
class DemoSizes:
  """How many volumes to make. Each phantom / augmented copy carries one to two samples."""
  phantoms_train: int = 1500
  phantoms_heldout: int = 150
  copies_train: int = 40         # augmented copies per real source
  copies_heldout: int = 4
  size_2d: int = 64              # stored in-plane size of 2D copies

  @classmethod
  def quick(cls) -> 'DemoSizes':
    return cls(phantoms_train=48, phantoms_heldout=16, copies_train=2, copies_heldout=1)


# Phantom tasks, by fraction of phantoms: lesion yes/no, lesion side, report.
PHANTOM_TASKS = (('lesion', 0.45), ('side', 0.3), ('report', 0.25))


def _phantom_plan(n: int, rng: np.random.Generator) -> list[str]:
  tasks = []
  for task, frac in PHANTOM_TASKS:
    tasks += [task] * int(round(n * frac))
  tasks = (tasks + ['lesion'] * n)[:n]
  return [tasks[i] for i in rng.permutation(n)]


def build_demo_dataset(out_dir: str, sizes: DemoSizes = DemoSizes(), seed: int = 0,
                       log=None) -> dict:
  """Writes out_dir/scans/* and out_dir/samples.jsonl; returns a summary dict."""
  out_dir = os.path.abspath(out_dir)
  scan_dir = os.path.join(out_dir, 'scans')
  os.makedirs(scan_dir, exist_ok=True)
  np_rng = np.random.default_rng(seed)
  py_rng = random.Random(seed)
  records: list[dict] = []
  found, missing = available_sources()
  used_sources, failed = [], []
  for src, path in found:
    try:
      arr = read_source(src, path)
    except Exception as e:  # a decoder missing for one file must not stop the demo
      failed.append({'source': src.name, 'reason': f'{type(e).__name__}: {e}'})
      continue
    used_sources.append({'name': src.name, 'pip': src.pip, 'path': path, 'modality': src.modality,
                         'body_part': src.body_part, 'dims': src.dims,
                         'shape': list(arr.shape)})
    for split, copies in (('train', sizes.copies_train), ('heldout', sizes.copies_heldout)):
      for k in range(copies):
        aug = augment_real(arr, src.dims, np_rng, sizes.size_2d)
        if src.dims == 2:
          rel = f'scans/{src.name}_{split}_{k}.png'
          _write_png(os.path.join(out_dir, rel), aug)
        else:
          rel = f'scans/{src.name}_{split}_{k}.nii.gz'
          _write_nifti(os.path.join(out_dir, rel), aug, (1.0, 1.0, 1.0))
        records += real_samples(src, split, k, rel, py_rng)
  for split, n in (('train', sizes.phantoms_train), ('heldout', sizes.phantoms_heldout)):
    for i, task in enumerate(_phantom_plan(n, np_rng)):
      vol, label = make_phantom(np_rng, lesion=True if task == 'side' else None)
      name = f'phantom_{split}_{i:05d}'
      rel = f'scans/{name}.nii.gz'
      _write_nifti(os.path.join(out_dir, rel), vol, PHANTOM_SPACING)
      records += phantom_samples(name, split, rel, label, task, py_rng)
  write_jsonl(os.path.join(out_dir, 'samples.jsonl'), records)
  summary = {
      'samples': len(records),
      'splits': {s: sum(r['split'] == s for r in records) for s in ('train', 'heldout')},
      'by_task': _count(records, lambda r: f"{r['family']}/{r['task']}/{r['split']}"),
      'sources': used_sources,
      'missing_sources': [{'name': s.name, 'pip': s.pip} for s in missing],
      'failed_sources': failed,
  }
  with open(os.path.join(out_dir, 'dataset.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  if log is not None:
    print(f'demo data: {len(used_sources)} real sources ({len(missing)} not installed, '
          f'{len(failed)} unreadable), {summary["samples"]} samples {summary["splits"]} -> '
          f'{out_dir}', file=log)
  return summary


def _count(records, key) -> dict:
  out: dict = {}
  for r in records:
    k = key(r)
    out[k] = out.get(k, 0) + 1
  return dict(sorted(out.items()))


__all__ = ['BODY_PARTS', 'DemoSizes', 'MODALITIES', 'PhantomLabel', 'REAL_SOURCES', 'RealSource',
           'available_sources', 'augment_real', 'build_demo_dataset',
           'make_phantom', 'read_source']
