"""Training with the image-token cache vs reading volumes, `small` model, 3D scans.

    .venv/bin/python benchmarks/image_cache.py [--samples 32] [--steps 8] [--depth 32]

Builds a store of `--samples` random 3D scans (128 x 128 x depth after resizing: batch_size_3d=4
keeps the 2D in-plane size) with one question each, trains `small` with the vision tower frozen
(train.freeze=['vision_tower'], model.vision.dropout=0) for `--steps` steps reading volumes, runs
`radfm-jax cache-images` on that run's step-0 checkpoint, then trains the same steps from the same
checkpoint with data.image_cache=True. Printed: median step time and samples/s of both (the
first two steps, which compile, excluded), whether the losses agree, the cache-building time and
the store size before / after (volumes vs the token arrays).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import machine  # noqa: E402


def du(path: str) -> int:
  total = 0
  for folder, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
  return total


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--samples', type=int, default=32)
  ap.add_argument('--steps', type=int, default=8)
  ap.add_argument('--depth', type=int, default=32)
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--keep', default=None, help='keep the work folder here')
  args = ap.parse_args()

  from radfm_jax.config import load_config
  from radfm_jax.data.ingest import ingest
  from radfm_jax.data.tokenizer import train_sentencepiece
  from radfm_jax.train import loop

  root = args.keep or tempfile.mkdtemp(prefix='image_cache_bench_')
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  records, texts = [], []
  for i in range(args.samples):
    np.save(os.path.join(root, f'v{i}.npy'),
            rng.normal(0, 300, (160, 150, args.depth)).astype(np.int16))
    q, a = f'Is there a lesion in scan {i}?', 'Yes, a nodule.' if i % 2 else 'No.'
    texts += [q, a]
    records.append({'id': f's{i}', 'question': q, 'answer': a, 'split': 'train',
                    'images': [{'path': f'v{i}.npy', 'id': f'v{i}', 'modality': 'CT',
                                'position': {'question': 0}}]})
  with open(os.path.join(root, 'samples.jsonl'), 'w') as f:
    f.write('\n'.join(__import__('json').dumps(r) for r in records) + '\n')
  store = os.path.join(root, 'store')
  ingest(os.path.join(root, 'samples.jsonl'), store, log=open(os.devnull, 'w'))
  tok = os.path.join(root, 'tok.model')
  words = ('lesion nodule scan lung liver kidney brain chest abdomen pelvis contrast enhancing '
           'mass cyst fluid effusion fracture normal impression findings axial coronal sagittal '
           'left right upper lower lobe segment artery vein bone tissue oedema calcified').split()
  corpus = texts + [' '.join(rng.choice(words, 8)) + '.' for _ in range(400)]
  with open(tok, 'wb') as f:
    f.write(train_sentencepiece(corpus, vocab_size=512))
  base = ['model.llama.vocab_size=512', f'data.store={store}', f'data.tokenizer={tok}', f'data.batch_size_3d={args.batch}',
          f'data.depth_buckets=[{args.depth}]', 'data.text_lengths=[128]', 'data.max_images=1',
          "train.freeze=['vision_tower']", 'model.vision.dropout=0.0',
          f'train.steps={args.steps}', 'train.warmup_steps=1', 'train.checkpoint_every=0',
          'train.async_checkpoint=False', 'train.tensorboard=False', 'train.log_every=1']
  spec = 'configs/radfm.py:model=small,mesh=cpu'
  volumes_bytes = du(store)
  print(f'machine: {machine()}')
  print(f'{args.samples} 3D scans 160x150x{args.depth} int16 -> {args.batch} x 3 x 128 x 128 x '
        f'{args.depth} per step; small model, vision tower frozen', flush=True)

  def timed(cfg, workdir):
    times = []
    result = loop.train(cfg, workdir, progress=False,
                        on_step=lambda n, v: times.append(v['step_time_s']))
    steady = times[2:] or times
    return result, statistics.median(steady)

  plain_dir, cached_dir = os.path.join(root, 'plain'), os.path.join(root, 'cached')
  plain, t_plain = timed(load_config(spec, base), plain_dir)
  loop.train(load_config(spec, base), cached_dir, max_steps=0, progress=False)
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  start = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'radfm_jax.cli', 'cache-images', '--checkpoint',
                  cached_dir, '--data', store, '--no-progress'], check=True, env=env)
  cache_s = time.perf_counter() - start
  cached, t_cached = timed(load_config(spec, base + ['data.image_cache=True']), cached_dir)
  tokens_bytes = du(os.path.join(store, 'image_tokens'))
  same = [plain.losses[s] == cached.losses[s] for s in sorted(plain.losses)]
  print(f'uncached: {t_plain * 1e3:.0f} ms/step, {args.batch / t_plain:.2f} samples/s')
  print(f'cached:   {t_cached * 1e3:.0f} ms/step, {args.batch / t_cached:.2f} samples/s '
        f'({t_plain / t_cached:.2f}x)')
  print(f'losses identical on {sum(same)}/{len(same)} steps')
  print(f'cache-images: {cache_s:.1f} s for {args.samples} scans (CLI, compile included)')
  print(f'store: volumes {volumes_bytes / 2**20:.2f} MiB; + image tokens '
        f'{tokens_bytes / 2**20:.2f} MiB ({tokens_bytes / args.samples / 1024:.1f} KiB per scan, '
        f'+{tokens_bytes / volumes_bytes:.1%})')
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
