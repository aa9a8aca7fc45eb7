"""Shared builders for the tests: tiny scans of every input kind, a tokenizer, configs, and a
jitted forward.

Imported by the tests (pytest puts tests/ on sys.path); nothing here downloads.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys

import numpy as np

from radfm_jax.config import DataConfig, model_config

# XLA options of every JAX process of the suite, the commands it starts included (conftest.py says
# why); RADFM_TEST_XLA_OPTIONS='' runs the suite with XLA's defaults.
XLA_TEST_OPTIONS = os.environ.get('RADFM_TEST_XLA_OPTIONS', '--xla_backend_optimization_level=0')


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a command the tests start: `devices` fake CPU devices, the suite's options."""
  return f'--xla_force_host_platform_device_count={devices} {XLA_TEST_OPTIONS}'.strip()


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')


def import_benchmark(name: str):
  """benchmarks/NAME.py as a module, for tests of what a benchmark builds or measures with (the
  scripts import their siblings, so their folder goes on sys.path)."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
  return importlib.import_module(name)


CORPUS = [
    'What is the modality of this scan?', 'The image shows a nodule in the left lung.',
    'Is there evidence of pneumonia?', 'Yes', 'No', 'Findings: normal chest. Impression: none.',
    'Can you describe the abnormality seen in the brain MRI?', 'A large mass with oedema.',
    'CT of the abdomen shows free fluid and 3 cysts of 12 mm.',
] * 40


@functools.lru_cache(maxsize=None)
def spm_proto(vocab_size: int = 512) -> bytes:
  from radfm_jax.data.tokenizer import train_sentencepiece
  return train_sentencepiece(CORPUS, vocab_size=vocab_size)


def tokenizer(max_images: int = 100, num_latents: int = 32):
  from radfm_jax.data.tokenizer import Tokenizer
  return Tokenizer(spm_proto(), max_images=max_images, num_latents=num_latents)


def tiny_model():
  return model_config('tiny')


def jitted_forward(model):
  """`model(tokens, images)` as one jitted program, for references that call the full forward
  (op by op, every operation of the towers is dispatched and compiled on its own)."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, tokens, images: nnx.merge(graphdef, state)(tokens, images))
  return lambda tokens, images: fn(state, tokens, images)


def data_config(**overrides) -> DataConfig:
  """Tiny shapes: 2D -> 32x32x4, single 3D -> 16x16xD, depth buckets {4, 8, 12, 16}; 2D images
  resized as the 3D ones (`resize_2d='nearest'`), so expected inputs are index arithmetic (the
  original's bicubic 2D step has its own tests: tests/test_data_transforms.py)."""
  base = dict(image_size_2d=32, image_size_3d_single=16, depth_buckets=(4, 8, 12, 16),
              batch_size_2d=2, batch_size_3d=1, text_lengths=(128, 256, 512), max_images=4,
              resize_2d='nearest')
  base.update(overrides)
  return DataConfig(**base)


def model_inputs(batch: dict) -> dict:
  """A pipeline batch as the model takes it, in numpy: through the one device-side step
  (`batch.device_inputs`; data.host_dtype='stored' 3D batches carry stored voxels + maps)."""
  import jax.numpy as jnp
  from radfm_jax.data import batch as batch_lib
  assert set(batch) == set(batch_lib.host_keys(batch))
  on_device = batch_lib.device_inputs({k: jnp.asarray(v) for k, v in batch.items()})
  return {k: np.asarray(v) for k, v in on_device.items()}


def original_min_max(case: list[np.ndarray]) -> list[np.ndarray]:
  """The original's 3D normalisation of a case (RadioVQA & co., docs/original.md 11.1), in NumPy:
  `image = (image - image.min()) / (image.max() - image.min())` over all its images together,
  then `torch.from_numpy(image).float()`. A float32 case stays float32 throughout, as there; an
  integer case subtracts exactly (int64 here: the original's int16 would wrap past 32767, which
  no real CT range reaches) and divides in float64 (numpy's true division of integers), then is
  cast to float32. Each image [C, H, W, D] -> float32 of the same shape."""
  lo, hi = min(x.min() for x in case), max(x.max() for x in case)
  if all(x.dtype == np.float32 for x in case):
    return [(x - lo) / (hi - lo) for x in case]            # numpy float32 scalars: float32 ops
  return [((x.astype(np.int64) - int(lo)) / (int(hi) - int(lo))).astype(np.float32)
          for x in case]


def random_cases(seed: int) -> dict[str, list[np.ndarray]]:
  """Random 3D cases (lists of images [C, 12, 10, 8]) of each stored dtype, by dtype name: one or
  two images, grey or RGB, each case wide enough that a reciprocal-product min-max is 1 ulp off
  somewhere (tests of `original_min_max` parity)."""
  rng = np.random.default_rng(seed)
  return {
      'int16': [rng.integers(-1024, 3072, (1, 12, 10, 8), dtype=np.int16),
                rng.integers(-900, 2000, (1, 12, 10, 8), dtype=np.int16)],
      'uint8': [rng.integers(3, 251, (1, 12, 10, 8), dtype=np.uint8)],
      'float32': [(rng.normal(40, 300, (1, 12, 10, 8))).astype(np.float32),
                  (rng.random((3, 12, 10, 8)) * 7.3 - 1.1).astype(np.float32)],
  }


def ras_affine(spacing=(1.0, 1.0, 2.0), flip_xy=False):
  aff = np.diag(list(spacing) + [1.0])
  if flip_xy:
    aff[0, 0], aff[1, 1] = -spacing[0], -spacing[1]
  return aff


def write_nifti(path, data, affine=None):
  import nibabel as nib
  affine = ras_affine() if affine is None else affine
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units('mm', 'sec')
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, str(path))
  return str(path)


def ct_volume(shape=(20, 18, 10), seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(0, 300, shape)).astype(np.int16)


def write_dicom_series(folder, volume, spacing=(0.8, 0.7), thickness=2.5, slope=1.0,
                       intercept=-1024.0, shuffle_files=True):
  """volume [rows, cols, slices] (stored values) -> one axial DICOM file per slice (LPS frame)."""
  import pydicom
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  os.makedirs(folder, exist_ok=True)
  series_uid = generate_uid()
  n = volume.shape[2]
  order = list(range(n))
  if shuffle_files:
    order = list(np.random.default_rng(1).permutation(n))
  for file_no, k in enumerate(order):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b'\0' * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = 'CT'
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = int(n - k)          # deliberately reversed: positions must win
    ds.ImagePositionPatient = [0.0, 0.0, float(k * thickness)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.SliceThickness = thickness
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = volume.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = 'MONOCHROME2'
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(volume[:, :, k].astype(np.uint16)).tobytes()
    ds.save_as(os.path.join(folder, f'slice_{file_no:03d}.dcm'), enforce_file_format=True)
  return str(folder)


def write_png(path, array):
  from PIL import Image
  Image.fromarray(array).save(str(path))
  return str(path)


def write_manifest(path, records):
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  return str(path)


def ingest_paths(tmp_path, *paths, **kw):
  """Ingests one sample per scan path into tmp_path/store; (report, store, stderr text)."""
  import io

  from radfm_jax.data.ingest import ingest
  from radfm_jax.data.store import VolumeStore
  records = [{'id': f's{i}', 'question': 'q', 'answer': 'a', 'images': [{'path': p}]}
             for i, p in enumerate(paths)]
  manifest = write_manifest(tmp_path / 'm.jsonl', records)
  log = io.StringIO()
  report = ingest(manifest, str(tmp_path / 'store'), log=log, **kw)
  return report, VolumeStore(str(tmp_path / 'store')), log.getvalue()


def stored_scan(report, store, path):
  """(array, attributes, scan id) of the scan an ingest `report` stored from `path`."""
  (sid,) = [i for i in report.stored if store.attributes(i)['source'] == str(path)]
  return store.read(sid), store.attributes(sid), sid


def reject_reason(report, path):
  """Why an ingest `report` rejected the scan at `path`."""
  (reject,) = [r for r in report.rejects if 'scan_id' in r and r['path'] == str(path)]
  return reject['reason']


def png_store(folder, n: int = 4):
  """`n` random 40 x 36 PNG scans (folder/x{i}.png), one VQA question each (split 'train'), in
  folder/samples.jsonl ingested into the VolumeStore folder/store, and the test tokenizer in
  folder/tok.model. Returns the store path."""
  import os

  import numpy as np
  from radfm_jax.data.ingest import ingest
  rng = np.random.default_rng(0)
  records = []
  for i in range(n):
    write_png(folder / f'x{i}.png', rng.integers(0, 255, (40, 36), dtype=np.uint8))
    records.append({'id': f's{i}', 'task': 'vqa', 'question': f'What is in image {i}?',
                    'answer': 'A nodule.', 'split': 'train',
                    'images': [{'path': f'x{i}.png', 'position': {'question': 0}}]})
  manifest = write_manifest(folder / 'samples.jsonl', records)
  with open(os.devnull, 'w') as log:
    ingest(manifest, str(folder / 'store'), log=log)
  (folder / 'tok.model').write_bytes(spm_proto())
  return str(folder / 'store')


def volume_records(folder, rng) -> list[dict]:
  """8 samples of random 3D float32 scans saved as folder/v{i}_{j}.npy (40 x 36 x depth 6-12; two
  samples hold two scans), one VQA question each, split 'train'."""
  import numpy as np
  records = []
  for i in range(8):
    images = []
    for j in range(2 if i in (2, 5) else 1):
      np.save(folder / f'v{i}_{j}.npy', rng.normal(0, 100, (40, 36, 6 + i % 4 * 2)).astype(np.float32))
      images.append({'path': f'v{i}_{j}.npy', 'id': f'v{i}_{j}', 'position': {'question': 0}})
    records.append({'id': f's{i}', 'task': 'vqa', 'question': f'What is in scan {i}?',
                    'answer': 'A nodule.' if i % 2 else 'Normal.', 'split': 'train',
                    'images': images})
  return records


def frozen_vision_overrides(store, tok, *extra) -> list[str]:
  """Config overrides of a 3-step `tiny` run on `store` with a frozen, dropout-free vision tower
  and 2D images taken whole (what the image-token cache needs)."""
  return [f'data.store={store}', f'data.tokenizer={tok}', 'data.batch_size_2d=8',
          'data.batch_size_3d=8', 'data.text_lengths=[128]', 'data.max_images=2',
          "train.freeze=['vision_tower']", 'model.vision.dropout=0.0',
          'data.random_crop_2d=False', 'train.steps=3',
          'train.warmup_steps=1', 'train.learning_rate=1e-3', 'train.checkpoint_every=0',
          'train.async_checkpoint=False', 'train.tensorboard=False'] + list(extra)
