"""Ingest throughput: single process vs an Apache Beam pipeline (DirectRunner, N worker processes).

    .venv/bin/python benchmarks/ingest.py [--png 64] [--dicom 32] [--nifti 6] \
        [--shape 512 512 48] [--beam-workers 2]

Per input kind, on the same files, times `radfm-jax ingest`'s library call in one process
(`--workers` reader threads = the CPU count) and `ingest --runner beam` on the DirectRunner with
`--beam-workers` processes (multi_processing mode, shards of scans per worker: data/shards.py):
  * 2D PNG: 512 x 512 grayscale images (smooth anatomy-like content + noise),
  * 2D DICOM: copies of pydicom's real uncompressed test images (MR 1024 x 1024, CR 1760 x 1760,
    US 600 x 800, 512 x 512 OT), one file per scan,
  * 3D NIfTI: CT-like int16 .nii.gz volumes of `--shape` (benchmarks/loader.py's phantom).
Prints scans/s and MB/s of decoded voxels over the wall time, the store's bytes per scan, and the
per-worker rate that docs/performance.md projects MedMD with: for Beam, scans over the summed busy
time of its shards (each shard's result.json records the seconds its worker spent on it), which
leaves out Beam's start-up (pipeline translation, worker processes: 40-70 s on this loaded
machine), paid once per job and nothing next to a MedMD-sized one. Measured, not asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine  # noqa: E402
from loader import ct_phantom  # noqa: E402
from radfm_jax.data.ingest import ingest  # noqa: E402
from radfm_jax.data.store import VolumeStore  # noqa: E402

DICOM_FILES = ('MR2_UNCR.dcm', 'RG3_UNCR.dcm', 'OBXXXX1A.dcm', 'mlut_18.dcm')


def _records(paths):
  return [{'id': f's{i}', 'question': 'What is shown?', 'answer': 'A scan.',
           'images': [{'path': p, 'id': f'scan{i}', 'position': {'question': 0}}]}
          for i, p in enumerate(paths)]


def write_png(folder, n):
  from PIL import Image
  y, x = np.mgrid[-1:1:512j, -1:1:512j]
  paths = []
  for i in range(n):
    rng = np.random.default_rng(i)
    img = 120 + 80 * np.exp(-((x - rng.uniform(-.3, .3)) ** 2 + y ** 2) / .2) * ((x * x + y * y) < .8)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    paths.append(os.path.join(folder, f'x{i:04d}.png'))
    Image.fromarray(img).save(paths[-1])
  return paths


def write_dicom(folder, n):
  from pydicom.data import get_testdata_file
  paths = []
  for i in range(n):
    name = DICOM_FILES[i % len(DICOM_FILES)]
    paths.append(os.path.join(folder, f'd{i:04d}_{name}'))
    shutil.copyfile(get_testdata_file(name), paths[-1])
  return paths


def write_nifti(folder, n, shape):
  import nibabel as nib
  paths = []
  for i in range(n):
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    img = nib.Nifti1Image(ct_phantom(shape, i), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    paths.append(os.path.join(folder, f'ct_{i:03d}.nii.gz'))
    nib.save(img, paths[-1])
  return paths


def _disk_bytes(folder):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _busy_seconds(out):
  """The seconds the shards of a Beam-written store took, summed over workers."""
  import json
  folder = os.path.join(out, 'shards')
  total = 0.0
  for name in os.listdir(folder):
    with open(os.path.join(folder, name, 'result.json')) as f:
      total += json.load(f)['seconds']
  return total


def measure(paths, out, runner, workers):
  """(wall seconds, worker-seconds, scans stored, MB of decoded voxels, store bytes)."""
  from radfm_jax.data.beam_ingest import ingest_beam
  log = open(os.devnull, 'w')
  start = time.perf_counter()
  if runner == 'local':
    report = ingest(_records(paths), out, log=log)
  else:
    report = ingest_beam(_records(paths), out, ['--direct_running_mode=multi_processing',
                                                f'--direct_num_workers={workers}'], log=log)
  seconds = time.perf_counter() - start
  assert not report.rejects, report.rejects[:2]
  store = VolumeStore(out)
  voxels = sum(np.prod(store.info(i)['shape']) * np.dtype(store.info(i)['dtype']).itemsize
               for i in store.index())
  busy = seconds if runner == 'local' else _busy_seconds(out)
  return seconds, busy, len(store.index()), voxels / 1e6, _disk_bytes(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--png', type=int, default=64)
  parser.add_argument('--dicom', type=int, default=32)
  parser.add_argument('--nifti', type=int, default=6)
  parser.add_argument('--shape', type=int, nargs=3, default=[512, 512, 48])
  parser.add_argument('--beam-workers', type=int, default=2)
  args = parser.parse_args()
  import logging
  logging.getLogger().setLevel(logging.WARNING)       # Beam's INFO lines
  print(f'machine: {machine()}; load average {os.getloadavg()[0]:.1f}')
  with tempfile.TemporaryDirectory() as tmp:
    kinds = {'2D PNG': write_png(tmp, args.png), '2D DICOM': write_dicom(tmp, args.dicom),
             '3D NIfTI': write_nifti(tmp, args.nifti, tuple(args.shape))}
    print(f'{"input":9s} {"runner":9s} {"scans":>5s} {"wall s":>6s} {"scans/s":>8s} {"MB/s":>7s} '
          f'{"per worker: scans/s":>19s} {"MB/s":>6s} {"store B/scan":>12s}')
    for kind, paths in kinds.items():
      for runner, workers in (('local', 1), ('beam', args.beam_workers)):
        out = os.path.join(tmp, f'store_{kind[-5:].strip()}_{runner}')
        seconds, busy, scans, mb, size = measure(paths, out, runner, workers)
        print(f'{kind:9s} {runner + (f" x{workers}" if runner == "beam" else ""):9s} {scans:5d} '
              f'{seconds:6.1f} {scans / seconds:8.2f} {mb / seconds:7.1f} '
              f'{scans / busy:19.2f} {mb / busy:6.1f} {size / scans:12,.0f}', flush=True)
        shutil.rmtree(out)
    print(f'load average after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
