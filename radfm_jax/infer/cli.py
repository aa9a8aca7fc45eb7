"""`radfm-jax generate`: answers for scans and prompts, from any checkpoint.

One prompt (the answer goes to stdout):

    radfm-jax generate --checkpoint ckpt/ --tokenizer tokenizer.model \\
        --image a.nii.gz --image b.png --prompt "Compare <image> with <image>. Any change?"

A file of prompts (JSONL in, JSONL out; image paths relative to the input file's folder):

    radfm-jax generate --checkpoint ckpt/ --tokenizer tokenizer.model \\
        --input prompts.jsonl --output answers.jsonl --batch-size 4
    # each input line: {"id": "q1", "prompt": "... <image> ...", "images": ["scan.nii.gz", ...]}
    # (an image may also be {"path": ..., "modality": "CT"}); each output line adds "prediction"

Parameters are restored sharded over every available device (one `fsdp` mesh axis). Batches are
padded to `--batch-size` so every batch of a run reuses one compiled program per prompt bucket.
"""

from __future__ import annotations

import json
import os
import sys
import time


def add_arguments(parser):
  parser.add_argument('--checkpoint', required=True,
                      help='converted checkpoint, training workdir or step folder')
  parser.add_argument('--step', type=int, default=None, help='training step (default: latest)')
  parser.add_argument('--tokenizer', default=None,
                      help='SentencePiece tokenizer.model (default: found beside the checkpoint)')
  parser.add_argument('--prompt', help='prompt with one <image> marker per --image')
  parser.add_argument('--image', action='append', default=[], help='scan path (repeatable)')
  parser.add_argument('--modality', action='append', default=None,
                      help='modality per --image (e.g. CT; matters for CT-window intensity)')
  parser.add_argument('--input', help='JSONL of {"id", "prompt", "images": [paths]}')
  parser.add_argument('--output', help='JSONL written in file mode (default: stdout)')
  parser.add_argument('--batch-size', type=int, default=1)
  add_sampling_arguments(parser)


def add_sampling_arguments(parser):
  """Sampling and preprocessing flags shared with `radfm-jax eval`."""
  parser.add_argument('--max-new-tokens', type=int, default=200)
  parser.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  parser.add_argument('--top-k', type=int, default=0, help='0 = off')
  parser.add_argument('--top-p', type=float, default=1.0, help='1 = off')
  parser.add_argument('--stop-ids', default='2,1',
                      help='comma-separated stop ids; "1" alone is exact parity with the original')
  parser.add_argument('--seed', type=int, default=0, help='sampling seed')
  parser.add_argument('--intensity', default=None,
                      help='intensity policy: radfm | ct_window | ct_windows3 | percentile '
                           "(default: the training run's, else radfm)")


def sampling_from_args(args):
  from radfm_jax.infer.generate import SamplingConfig
  stops = tuple(int(s) for s in str(args.stop_ids).replace(' ', '').split(',') if s)
  return SamplingConfig(max_new_tokens=args.max_new_tokens, stop_ids=stops,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def load_for_inference(args):
  """(model, tokenizer, data config) from --checkpoint / --step / --tokenizer / --intensity."""
  from radfm_jax import api
  return api.load_for_generation(args.checkpoint, args.tokenizer, step=getattr(args, 'step', None),
                                 intensity=args.intensity)


def _image_entry(entry, base: str) -> tuple[str, str]:
  if isinstance(entry, dict):
    return os.path.join(base, entry['path']), str(entry.get('modality') or '')
  return os.path.join(base, str(entry)), ''


def read_prompts(path: str) -> list[dict]:
  """Input JSONL -> [{'id', 'prompt', 'paths', 'modalities'}] (paths resolved)."""
  base = os.path.dirname(os.path.abspath(path))
  items = []
  with open(path) as f:
    for n, line in enumerate(f):
      if not line.strip():
        continue
      rec = json.loads(line)
      if 'prompt' not in rec:
        raise ValueError(f'{path}:{n + 1}: no "prompt" field')
      entries = [_image_entry(e, base) for e in rec.get('images', [])]
      items.append({'id': rec.get('id', str(n)), 'prompt': rec['prompt'],
                    'paths': [p for p, _ in entries], 'modalities': [m for _, m in entries]})
  return items


def read_images(paths, modalities):
  """Paths -> arrays [C, H, W, D] (ingest readers) and their modalities (given or from the file)."""
  from radfm_jax.data.ingest import read_scan
  arrays, mods = [], []
  for path, given in zip(paths, modalities):
    array, attrs = read_scan(path, {'modality': given} if given else None)[0]
    arrays.append(array)
    mods.append(given or attrs.get('modality', ''))
  return arrays, mods


def generate_items(model, tokenizer, data_cfg, items, sampling, batch_size: int, seed: int = 0,
                   log=None):
  """Yields (item, prediction, new ids) for items {'prompt', 'paths', 'modalities'} in order."""
  from radfm_jax.infer.text import generate_batch
  start, done = time.perf_counter(), 0
  for first in range(0, len(items), batch_size):
    chunk = items[first:first + batch_size]
    # Pad the last batch by repeating its final item: one compiled program for the whole run.
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    loaded = [read_images(it['paths'], it['modalities']) for it in padded]
    texts, ids = generate_batch(model, tokenizer, [it['prompt'] for it in padded],
                                [a for a, _ in loaded], modalities=[m for _, m in loaded],
                                sampling=sampling, data_cfg=data_cfg, seed=seed + first,
                                return_ids=True)
    for it, text, row in zip(chunk, texts, ids):
      yield it, text, row
    done += len(chunk)
    rate = done / (time.perf_counter() - start)
    print(f'generate: {done}/{len(items)} ({rate:.2f} samples/s)', file=log or sys.stderr)


def run(args) -> int:
  if (args.prompt is None) == (args.input is None):
    print('radfm-jax generate: give either --prompt (with --image ...) or --input FILE',
          file=sys.stderr)
    return 2
  if args.batch_size < 1:
    print('radfm-jax generate: --batch-size must be >= 1', file=sys.stderr)
    return 2
  sampling = sampling_from_args(args)
  model, tokenizer, data_cfg = load_for_inference(args)
  if args.prompt is not None:
    mods = args.modality or [''] * len(args.image)
    if len(mods) != len(args.image):
      print(f'radfm-jax generate: {len(mods)} --modality for {len(args.image)} --image',
            file=sys.stderr)
      return 2
    item = {'id': '0', 'prompt': args.prompt, 'paths': list(args.image), 'modalities': mods}
    items = [item]
  else:
    items = read_prompts(args.input)
  out = open(args.output, 'w') if args.output else sys.stdout
  try:
    for it, text, row in generate_items(model, tokenizer, data_cfg, items, sampling,
                                        args.batch_size, args.seed):
      if args.input is None:
        print(text, file=out)
      else:
        out.write(json.dumps({'id': it['id'], 'prompt': it['prompt'], 'images': it['paths'],
                              'prediction': text, 'new_tokens': len(row)}) + '\n')
        out.flush()
  finally:
    if out is not sys.stdout:
      out.close()
  return 0
