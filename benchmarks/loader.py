"""Loader throughput: Grain + TensorStore pipeline vs a plain nibabel .nii.gz read + resize.

    .venv/bin/python benchmarks/loader.py [--scans 32] [--shape 256 256 64] [--threads 2]

Writes `--scans` synthetic CT-like int16 volumes as .nii.gz to a temp dir, ingests them into a
VolumeStore, then on the same scans in one run times
  * baseline: per sample `nib.load` -> RAS -> voxels -> the same transforms (RadFM min-max,
    nearest resize to the bucket) -> float32 [1, 1, 3, H, W, D]: a per-file loader, and
  * pipeline: `make_dataset` batches (TensorStore read, same transforms, tokenization, collation)
    with `--threads` Grain read threads,
and prints samples/s, MB/s of source voxels and the ratio; also the bare read (decode only) of
both formats. Measured, not asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from radfm_jax.config import DataConfig, model_config  # noqa: E402
from radfm_jax.data import pipeline, transforms  # noqa: E402
from radfm_jax.data.ingest import ingest  # noqa: E402
from radfm_jax.data.store import VolumeStore  # noqa: E402
from radfm_jax.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402


def ct_phantom(shape, seed):
  """Body ellipse (~40 HU) with lungs (-800), a bone ring (700), a lesion and noise, in int16."""
  rng = np.random.default_rng(seed)
  h, w, d = shape
  y, x = np.mgrid[-1:1:complex(h), -1:1:complex(w)]
  slab = np.full((h, w), -1000.0)
  body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
  slab[body] = 40
  slab[((x + 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -800
  slab[((x - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -800
  slab[body & ((x / 0.9) ** 2 + (y / 0.7) ** 2 > 0.9)] = 700
  vol = np.repeat(slab[:, :, None], d, axis=2)
  c = rng.integers(d // 4, 3 * d // 4)
  vol[h // 2 - 8:h // 2 + 8, w // 2 - 8:w // 2 + 8, c - 3:c + 3] = 90
  vol += rng.normal(0, 20, vol.shape)
  return vol.astype(np.int16)


def write_scans(folder, n, shape):
  import nibabel as nib
  paths = []
  for i in range(n):
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])            # LPS-stored, like many CT exports
    img = nib.Nifti1Image(ct_phantom(shape, i), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = os.path.join(folder, f'ct_{i:03d}.nii.gz')
    nib.save(img, path)
    paths.append(path)
  return paths


def baseline_sample(path, target, data_cfg):
  """The plain per-file loader: read .nii.gz, RAS, then the very same transforms as the pipeline."""
  import nibabel as nib
  img = nib.as_closest_canonical(nib.load(path))
  vol = np.asanyarray(img.dataobj)[None]                 # [1, H, W, D]
  return transforms.prepare_images([vol], ['CT'], target, data_cfg)[None]   # [1, 1, 3, H, W, D]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scans', type=int, default=32)
  parser.add_argument('--shape', type=int, nargs=3, default=(256, 256, 64))
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--workers', type=int, default=0)
  args = parser.parse_args()
  shape = tuple(args.shape)
  src_mb = np.prod(shape) * 2 / 2 ** 20

  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    paths = write_scans(tmp, args.scans, shape)
    print(f'wrote {args.scans} scans {shape} int16 .nii.gz in {time.perf_counter() - t:.1f}s')
    records = [{'id': f's{i}', 'task': 'report', 'question': 'Write the report for this CT.',
                'answer': f'Findings: lesion {i}. Impression: stable.',
                'images': [{'path': p, 'position': {'question': 0}, 'modality': 'CT'}]}
               for i, p in enumerate(paths)]
    t = time.perf_counter()
    ingest(records, os.path.join(tmp, 'store'), log=open(os.devnull, 'w'))
    t_ingest = time.perf_counter() - t
    store = VolumeStore(os.path.join(tmp, 'store'))
    disk = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d)  # noqa
                         for f in fs) / 2 ** 20
    nii_mb = sum(os.path.getsize(p) for p in paths) / 2 ** 20
    print(f'ingest: {t_ingest:.1f}s ({args.scans / t_ingest:.1f} scans/s); on disk: .nii.gz '
          f'{nii_mb:.0f} MiB, store {disk(store.root):.0f} MiB')

    data_cfg = DataConfig(image_size_2d=512, image_size_3d_single=shape[0],
                          depth_buckets=tuple(range(4, 65, 4)), batch_size_3d=1,
                          text_lengths=(128, 256), max_images=1, num_workers=args.workers)
    corpus = [r['question'] + ' ' + r['answer'] for r in records] * 20
    tok = Tokenizer(train_sentencepiece(corpus, vocab_size=300), num_latents=32)
    model = model_config('tiny', **{'llama.vocab_size': tok.vocab_size})
    target = transforms.sample_shape([shape[2]], data_cfg, 1)

    # Bare reads (decode only).
    import nibabel as nib
    ids = [im['id'] for r in store.manifest() for im in r['images']]
    t = time.perf_counter()
    for p in paths:
      np.asanyarray(nib.load(p).dataobj)
    t_nib_read = time.perf_counter() - t
    t = time.perf_counter()
    for i in ids:
      store.read(i)
    t_ts_read = time.perf_counter() - t

    # Baseline loader.
    t = time.perf_counter()
    base = [baseline_sample(p, target, data_cfg) for p in paths]
    t_base = time.perf_counter() - t

    # Pipeline (one warm-up batch excluded: thread start-up and the first bucket plan).
    ds = pipeline.make_dataset(data_cfg, model, store, tok, seed=0, process_index=0,
                               process_count=1, num_epochs=2, num_threads=args.threads)
    it = iter(ds)
    next(it)
    t = time.perf_counter()
    n = 0
    for batch in it:
      n += batch['images'].shape[0]
      if n >= args.scans:
        break
    t_pipe = time.perf_counter() - t
    if hasattr(it, 'close'):
      it.close()

    # Same numbers from both paths (first sample of the manifest vs the baseline).
    check = pipeline.make_dataset(data_cfg, model, store, tok, seed=0, process_index=0,
                                  process_count=1, num_epochs=1,
                                  records=store.manifest()[:1])
    same = np.array_equal(next(iter(check))['images'], base[0])

    def line(name, seconds, count):
      return (f'{name:<28} {count / seconds:8.1f} samples/s {count * src_mb / seconds:9.1f} MB/s '
              f'(source int16 voxels)')
    print(f'bucket {target}, {args.scans} samples, threads={args.threads}, '
          f'workers={args.workers}; outputs identical: {same}')
    print(line('nibabel read only', t_nib_read, args.scans))
    print(line('tensorstore read only', t_ts_read, args.scans))
    print(line('nibabel read + resize', t_base, args.scans))
    print(line('grain + tensorstore', t_pipe, n))
    print(f'ratio read only: {t_nib_read / t_ts_read:.1f}x; '
          f'ratio loader: {(n / t_pipe) / (args.scans / t_base):.1f}x (goal >= 5x)')


if __name__ == '__main__':
  main()
