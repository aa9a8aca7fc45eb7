"""Loader throughput at CT sizes: Grain + TensorStore pipeline vs a plain nibabel .nii.gz loader.

    .venv/bin/python benchmarks/loader.py [--volumes 24] [--size 512] [--depths 40 158]
        [--out-size 256] [--threads 2] [--warm]

Writes `--volumes` CT-like int16 .nii.gz volumes of size x size x D (D spread over `--depths`;
the defaults are the issue's 24 volumes of 512x512x40..158), ingests them into a VolumeStore,
then adds training-resolution copies at `--out-size` (`ingest --train-resolution`, the same
ingest run again: the unchanged scans are skipped; the one-off cost of each step and the store
size before and after are printed), then on the same scans, in one run, times each loader
producing RadFM 3D model inputs [1, 1, 3, out, out, D'] (D' = the depth bucket, <= 64):
  * plain nibabel, 1 process: per file `nib.load` -> RAS -> voxels -> the same transforms
    (RadFM min-max, nearest resize to the bucket) -> float32;
  * the same plain loader over 2 worker processes (multiprocessing.Pool(2));
  * the pipeline, data.host_dtype='float32': `make_dataset` (TensorStore read, transforms,
    tokenization, collation) with `--threads` Grain threads, each batch put on the device;
  * the pipeline, data.host_dtype='stored': int16 voxels on the host, `batch.device_inputs`
    maps and repeats to 3 channels on the device (the time includes that step);
    these two with data.train_copies=False (the full 512x512xD scans are read);
  * the pipeline, host 'stored', reading the training-resolution copies (the defaults): only
    the D' slices of out x out kept, the same model inputs bit for bit.
Every timed loader starts cold (unless --warm): the page cache of every source file and every
store file is evicted first (`vmtouch -e` if installed, else fsync + posix_fadvise(DONTNEED) per
file; the line says which). The pipeline timings include building the dataset and its threads.
On a shared machine compare figures within one run only: the load average is printed. The
default run took 7-15 minutes on a loaded 2-core machine (writing the volumes 2.5-6.5, ingest
1.3-4, the copies 0.5-1); `--volumes 6` gives a quick look.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine  # noqa: E402
from radfm_jax.config import DataConfig, model_config  # noqa: E402
from radfm_jax.data import batch as batch_lib  # noqa: E402
from radfm_jax.data import pipeline, transforms  # noqa: E402
from radfm_jax.data.ingest import ingest  # noqa: E402
from radfm_jax.data.store import VolumeStore  # noqa: E402
from radfm_jax.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402


def ct_phantom(shape, seed):
  """Body ellipse (~40 HU) with lungs (-800), a bone ring (700), a lesion and noise, in int16."""
  rng = np.random.default_rng(seed)
  h, w, d = shape
  y, x = np.mgrid[-1:1:complex(h), -1:1:complex(w)]
  slab = np.full((h, w), -1000.0, np.float32)
  body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
  slab[body] = 40
  slab[((x + 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -800
  slab[((x - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -800
  slab[body & ((x / 0.9) ** 2 + (y / 0.7) ** 2 > 0.9)] = 700
  vol = np.repeat(slab[:, :, None], d, axis=2)
  c = rng.integers(d // 4, 3 * d // 4)
  vol[h // 2 - 8:h // 2 + 8, w // 2 - 8:w // 2 + 8, c - 3:c + 3] = 90
  vol += rng.normal(0, 20, vol.shape).astype(np.float32)
  return vol.astype(np.int16)


def write_scans(folder, shapes):
  import nibabel as nib
  paths = []
  for i, shape in enumerate(shapes):
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])            # LPS-stored, like many CT exports
    img = nib.Nifti1Image(ct_phantom(shape, i), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = os.path.join(folder, f'ct_{i:03d}.nii.gz')
    nib.save(img, path)
    paths.append(path)
  return paths


def evict(folders) -> str:
  """Drops every file under `folders` from the page cache; returns the method used."""
  files = [os.path.join(r, f) for d in folders for r, _, fs in os.walk(d) for f in fs]
  if shutil.which('vmtouch'):
    subprocess.run(['vmtouch', '-q', '-e'] + files, check=True)
    return 'vmtouch -e'
  for path in files:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)                                       # dirty pages are not dropped
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)
  return 'fsync + posix_fadvise(POSIX_FADV_DONTNEED) per file'


_CFG = {}


def baseline_sample(path):
  """The plain per-file loader: read .nii.gz, RAS, then the very same transforms as the pipeline."""
  import nibabel as nib
  data_cfg = _CFG['data']
  img = nib.as_closest_canonical(nib.load(path))
  vol = np.asanyarray(img.dataobj)[None]                 # [1, H, W, D]
  target = transforms.sample_shape([vol.shape[3]], data_cfg, 1)
  return transforms.prepare_images([vol], ['CT'], target, data_cfg)[None]   # [1, 1, 3, H, W, D]


def _init(data_cfg):
  _CFG['data'] = data_cfg


def compile_device_step(data_cfg, model, store, tok) -> float:
  """Compiles `batch.device_inputs` for every bucket of the plan (seconds): once per bucket
  shape, as the train step itself compiles, so it is left out of the loader's time."""
  import jax
  start = time.perf_counter()
  ds = pipeline.make_dataset(data_cfg, model, store, tok, seed=0, process_index=0,
                             process_count=1, num_epochs=1, log=open(os.devnull, 'w'))
  for key in ds.plan.buckets:
    if key.carrier is not None:
      empty = batch_lib.empty_batch(1, key.images, (key.height, key.width, key.depth),
                                    key.length, carrier=key.carrier)
      jax.block_until_ready(batch_lib.device_inputs(
          {k: jax.device_put(empty[k]) for k in batch_lib.host_keys(empty)})['images'])
  return time.perf_counter() - start


def run_pipeline(data_cfg, model, store, tok, threads, count):
  """(seconds, samples, (first tokens, its device images), host dtype) of one epoch, each
  batch put on the device."""
  import jax
  start = time.perf_counter()
  ds = pipeline.make_dataset(data_cfg, model, store, tok, seed=0, process_index=0,
                             process_count=1, num_epochs=1, num_threads=threads,
                             log=open(os.devnull, 'w'))
  n, first = 0, None
  for batch in ds:
    on_device = batch_lib.device_inputs(
        {k: jax.device_put(batch[k]) for k in batch_lib.host_keys(batch)})
    jax.block_until_ready(on_device['images'])
    if first is None:
      first = (batch['tokens'][0], np.asarray(on_device['images']))
    n += int(batch['attention_mask'].any(axis=1).sum())
  seconds = time.perf_counter() - start
  assert n == count, (n, count)
  return seconds, n, first, batch['images'].dtype


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--volumes', type=int, default=24)
  parser.add_argument('--size', type=int, default=512, help='in-plane size of the volumes')
  parser.add_argument('--depths', type=int, nargs=2, default=(40, 158))
  parser.add_argument('--out-size', type=int, default=256, help='RadFM 3D in-plane input size')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--warm', action='store_true', help='skip the page-cache eviction')
  parser.add_argument('--dir', default=None, help='scratch folder (default: a temp dir)')
  args = parser.parse_args()
  print(f'machine: {machine()}')
  depths = np.linspace(args.depths[0], args.depths[1], args.volumes).round().astype(int)
  shapes = [(args.size, args.size, int(d)) for d in depths]

  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    src = os.path.join(tmp, 'src')
    os.makedirs(src)
    t = time.perf_counter()
    paths = write_scans(src, shapes)
    raw_mb = sum(np.prod(s) * 2 for s in shapes) / 2 ** 20
    disk = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d)  # noqa
                         for f in fs) / 2 ** 20
    print(f'wrote {args.volumes} int16 .nii.gz volumes {args.size}x{args.size}x'
          f'{depths[0]}..{depths[-1]} ({raw_mb:.0f} MiB of voxels, {disk(src):.0f} MiB on disk) '
          f'in {time.perf_counter() - t:.0f} s')
    records = [{'id': f's{i}', 'task': 'report', 'question': 'Write the report for this CT.',
                'answer': f'Findings: lesion {i}. Impression: stable.',
                'images': [{'path': p, 'position': {'question': 0}, 'modality': 'CT'}]}
               for i, p in enumerate(paths)]
    store_dir = os.path.join(tmp, 'store')
    load = os.getloadavg()[0]
    t = time.perf_counter()
    ingest(records, store_dir, log=open(os.devnull, 'w'))
    t_ingest = time.perf_counter() - t
    store_mb = disk(store_dir)
    print(f'one-off ingest: {t_ingest:.1f} s ({args.volumes / t_ingest:.2f} volumes/s, '
          f'{raw_mb / t_ingest:.0f} MiB/s of voxels; load {load:.1f}); store {store_mb:.0f} '
          f'MiB on disk')
    load = os.getloadavg()[0]
    t = time.perf_counter()
    report = ingest(records, store_dir, log=open(os.devnull, 'w'),
                    train_resolution=args.out_size)
    t_copies = time.perf_counter() - t
    print(f'+ training-resolution copies (ingest --train-resolution {args.out_size} on the same '
          f'manifest): {report.copies} made in {t_copies:.1f} s (load {load:.1f}); store '
          f'{disk(store_dir):.0f} MiB on disk (+{disk(store_dir) - store_mb:.0f} MiB); ingest '
          f'with copies {t_ingest + t_copies:.1f} s in all')
    store = VolumeStore(store_dir)

    data_cfg = DataConfig(image_size_2d=args.out_size, image_size_3d_single=args.out_size,
                          depth_buckets=tuple(range(4, 65, 4)), batch_size_3d=1,
                          text_lengths=(128, 256), max_images=1)
    corpus = [r['question'] + ' ' + r['answer'] for r in records] * 20
    tok = Tokenizer(train_sentencepiece(corpus, vocab_size=300), num_latents=32)
    model = model_config('tiny', **{'llama.vocab_size': tok.vocab_size})
    _init(data_cfg)
    cold = 'warm page cache (--warm)'

    def timed(name, fn):
      nonlocal cold
      if not args.warm:
        cold = 'cold: ' + evict([src, store_dir])
      load = os.getloadavg()[0]
      t = time.perf_counter()
      out = fn()
      return name, time.perf_counter() - t, load, out

    results = []
    results.append(timed('plain nibabel, 1 process', lambda: [baseline_sample(p) for p in paths]))
    with multiprocessing.get_context('fork').Pool(2, initializer=_init,
                                                   initargs=(data_cfg,)) as pool:
      results.append(timed('plain nibabel, 2 workers',
                           lambda: pool.map(baseline_sample, paths, chunksize=1)))
    for mode, copies in (('float32', False), ('stored', False), ('stored', True)):
      cfg = dataclasses.replace(data_cfg, host_dtype=mode, train_copies=copies)
      if mode == 'stored' and not copies:
        print(f'device step compiled for every bucket in {compile_device_step(cfg, model, store, tok):.1f} s '
              '(not timed: once per bucket shape, like the train step)')
      name = f"grain+tensorstore, host {mode}{', copies' if copies else ''}"
      results.append(timed(name, lambda: run_pipeline(cfg, model, store, tok, args.threads,
                                                      args.volumes)))

    # Same model input from every path, for the pipeline's first sample.
    firsts = [res[3][2] for res in results[2:]]           # (tokens, images) per mode
    same_modes = all(np.array_equal(firsts[0][0], f[0]) and firsts[0][1].tobytes() == f[1].tobytes()
                     for f in firsts[1:])
    match = any(np.array_equal(firsts[0][1], x) for x in results[0][3])
    print(f'{args.volumes} samples -> [1, 1, 3, {args.out_size}, {args.out_size}, D<=64] float32; '
          f'{cold}; threads={args.threads}; pipeline first sample == a plain-loader sample: '
          f'{match}; every pipeline mode gives the same first model input (after the device '
          f'step): {same_modes}')
    base_rate = args.volumes / results[0][1]
    two_rate = args.volumes / results[1][1]
    for name, seconds, load, out in results:
      rate = args.volumes / seconds
      extra = f' (host batch dtype {out[3]})' if name.startswith('grain') else ''
      print(f'  {name:<40} {rate:7.2f} samples/s {raw_mb / seconds:8.0f} MiB/s voxels  '
            f'{rate / base_rate:5.1f}x 1-process  {rate / two_rate:5.1f}x 2-worker  '
            f'(load {load:.1f}){extra}')
    print('goal: pipeline >= 10x the 1-process plain loader and >= 5x the 2-worker one; compare '
          f'only within this run (shared machine: {machine()}; uptime: '
          f'{subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()})')


if __name__ == '__main__':
  main()
