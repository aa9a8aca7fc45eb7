"""Is the demo's vision path learning? Trains the demo (or any recipe of it) and measures, over
training, the image-token spread across scans, 1-NN separability of the tokens, the Perceiver
latents' attention over patches and the per-tower gradient / update norms; then the held-out
closed-question accuracy with its baselines (radfm_jax/eval/vision.py explains each figure).

    python benchmarks/vision_diagnostics.py --out /tmp/vd --steps 300 --every 100 \\
        --label baseline [--set demo.closed_first=0.4 --set 'train.lr_multipliers=...']

One JSON line per run goes to --jsonl (default OUT/vision_diagnostics.jsonl): the settings, the
machine (`lscpu` model name), `trajectory` (one entry per probe: step, spreads, separability,
attention, mean per-tower grad norm / update ratio since the previous probe) and `heldout` (the
demo's `score`). The data, store and tokenizer in OUT are built once and reused. Training runs in
segments of --every steps through the project's loop (a checkpoint at each), so a segment's
probe sees exactly the trained state.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return next((line.split(':', 1)[1].strip() for line in out.splitlines()
               if line.startswith('Model name')), 'unknown')


def _compact(report: dict) -> dict:
  return {'spread': report['spread'],
          'separability': {k: v['accuracy'] for k, v in report['separability'].items()},
          'majority': {k: v['majority'] for k, v in report['separability'].items()},
          'attention': report['perceiver_attention']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='/tmp/vision_diagnostics')
  parser.add_argument('--config', default=None, help='default: configs/demo.py')
  parser.add_argument('--steps', type=int, default=300, help='train.steps (reduced: the full '
                      'demo is 800)')
  parser.add_argument('--every', type=int, default=100, help='probe every this many steps')
  parser.add_argument('--set', action='append', default=[], metavar='a.b=value',
                      help='config override (repeatable)')
  parser.add_argument('--families', default='real,phantom',
                      help='train only on these sample families (e.g. real: the real scans alone)')
  parser.add_argument('--label', default='run')
  parser.add_argument('--jsonl', default=None)
  parser.add_argument('--max-new-tokens', type=int, default=None,
                      help='generation length at evaluation (default generate.max_new_tokens)')
  args = parser.parse_args()

  from radfm_jax import demo
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  run = demo.setup(out, config=args.config, overrides=args.set, steps=args.steps)
  cfg = run.cfg

  import jax
  from absl import logging as absl_logging
  from flax import nnx
  from radfm_jax.data.tokenizer import Tokenizer
  from radfm_jax.eval.vision import vision_report
  from radfm_jax.train import loop
  absl_logging.set_verbosity(absl_logging.ERROR)
  tokenizer = Tokenizer(run.tokenizer_path, max_images=cfg.model.max_images,
                        num_latents=cfg.model.perceiver.num_latents)
  probes = demo.vision_probes(run.store, run.heldout, cfg.data)
  workdir = os.path.join(out, 'train_' + args.label)
  shutil.rmtree(workdir, ignore_errors=True)
  families = set(args.families.split(','))
  data = demo.training_batches(cfg, run.store, tokenizer,
                               [r for r in run.train if r['family'] in families])
  mesh, rules, graphdef, tx, _, shardings = loop.build(cfg)

  def probe(params, step, towers):
    model = nnx.merge(graphdef, params)
    entry = {'step': step, **{f: _compact(vision_report(model, p)) for f, p in probes.items()},
             'towers': towers.summary()}
    print(json.dumps({'label': args.label, 'step': step,
                      'real_ratio': entry.get('real', {}).get('spread', {}).get('ratio'),
                      'phantom_ratio': entry.get('phantom', {}).get('spread', {}).get('ratio'),
                      'real_sep': entry.get('real', {}).get('separability')}), flush=True)
    return entry

  trajectory = []
  start = time.perf_counter()
  state = loop.init_state(cfg, mesh, rules, tx, shardings)     # what the first segment starts from
  trajectory.append(probe(state.params, 0, demo.TowerLog(window=1)))
  del state
  step, losses = 0, {}
  while step < cfg.train.steps:
    towers = demo.TowerLog(window=args.every)
    result = loop.train(cfg, workdir, data=data, max_steps=min(step + args.every, cfg.train.steps),
                        progress=False, verbose=False, on_step=towers)
    losses.update(result.losses)
    step = result.step
    entry = probe(result.state.params, step, towers)
    entry['loss'] = sum(losses[s] for s in sorted(losses)[-10:]) / min(10, len(losses))
    trajectory.append(entry)
  train_s = time.perf_counter() - start
  model = nnx.merge(graphdef, result.state.params)
  answers = demo.answer_heldout(model, run.heldout, run.store, tokenizer, cfg,
                                max_new_tokens=args.max_new_tokens)
  metrics = demo.score(run.heldout, answers)
  line = {'label': args.label, 'cpu': cpu_model(), 'devices': jax.device_count(),
          'steps': step, 'overrides': args.set, 'families': sorted(families), 'train_s': train_s,
          'heldout': metrics, 'trajectory': trajectory}
  with open(args.jsonl or os.path.join(out, 'vision_diagnostics.jsonl'), 'a') as f:
    f.write(json.dumps(line) + '\n')
  closed = {k: round(v['accuracy'], 3) for k, v in metrics['closed'].items()}
  print(json.dumps({'label': args.label, 'train_s': round(train_s), 'closed': closed,
                    'rouge_l': metrics.get('rouge_l')}), flush=True)


if __name__ == '__main__':
  main()
