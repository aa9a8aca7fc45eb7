"""Int8 (Qwix PTQ) vs full-precision greedy answers on the held-out questions of a demo run.

    .venv/bin/python benchmarks/quantize_agreement.py --run demo_out [--limit 0] [--mode w8a8]

`--run` is the output folder of `radfm-jax demo` (train/, store/, tokenizer.model). Every held-out
question is answered greedily by the trained model and by its int8 copy
(`radfm_jax.infer.quantize.quantize`, `--mode` int8 or w8a8), in the same batches
(`demo.answer_heldout`); printed: the fraction of identical answers (goal >= 95%), the same per
question kind, the closed-question accuracy of both, and the weight bytes.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--run', required=True, help='radfm-jax demo output folder')
  ap.add_argument('--limit', type=int, default=0, help='first N held-out questions (0 = all)')
  ap.add_argument('--json', default=None, help='append the result as one JSON line here')
  ap.add_argument('--mode', default='int8', choices=('int8', 'w8a8'),
                  help='int8 weights, or w8a8: int8 weights and activations')
  args = ap.parse_args()

  from radfm_jax import api, checkpoint
  from radfm_jax.config import validate
  from radfm_jax.data.store import VolumeStore
  from radfm_jax.demo import answer_heldout, score
  from radfm_jax.infer import quantize as quant

  workdir = os.path.join(args.run, 'train')
  model, tokenizer, _ = api.load_for_generation(workdir, os.path.join(args.run, 'tokenizer.model'))
  cfg = validate(checkpoint.read_step_config(os.path.join(workdir, 'checkpoints')))
  store = VolumeStore(os.path.join(args.run, 'store'))
  heldout = [r for r in store.manifest() if r.get('split') == 'heldout']
  heldout = heldout[:args.limit] if args.limit else heldout
  print(f'machine: {machine()}')
  print(f'{len(heldout)} held-out questions, model {cfg.model.size}, '
        f'max_new_tokens {cfg.generate.max_new_tokens}', flush=True)

  t = time.perf_counter()
  qmodel = quant.quantize(model, args.mode)
  quant_s = time.perf_counter() - t
  answers = {}
  for name, m in (('full', model), (args.mode, qmodel)):
    t = time.perf_counter()
    answers[name] = answer_heldout(m, heldout, store, tokenizer, cfg)
    print(f'{name}: answered in {time.perf_counter() - t:.0f} s', flush=True)
  same = [a == b for a, b in zip(answers['full'], answers[args.mode])]
  kinds = {}
  for rec, ok in zip(heldout, same):
    kind = f"{rec.get('kind', '?')} {rec.get('family', '')}/{rec.get('task', '')}"
    n, k = kinds.get(kind, (0, 0))
    kinds[kind] = (n + 1, k + ok)
  result = {'run': os.path.abspath(args.run), 'mode': args.mode, 'questions': len(heldout),
            'agreement': sum(same) / len(same),
            'by_kind': {k: {'n': n, 'agree': a / n} for k, (n, a) in sorted(kinds.items())},
            'closed_accuracy_full': score(heldout, answers['full']).get('closed_all', {}).get(
                'accuracy'),
            'closed_accuracy_int8': score(heldout, answers[args.mode]).get('closed_all', {}).get(
                'accuracy'),
            'weight_bytes_full': quant.weight_bytes(model),
            'weight_bytes_int8': quant.weight_bytes(qmodel), 'quantize_s': quant_s,
            'machine': machine()}
  print(f"agreement: {sum(same)}/{len(same)} = {result['agreement']:.1%} identical greedy answers "
        f"(goal >= 95%)")
  for kind, row in result['by_kind'].items():
    print(f"  {kind}: {row['agree']:.1%} of {row['n']}")
  print(f"closed accuracy: full {result['closed_accuracy_full']}, {args.mode} "
        f"{result['closed_accuracy_int8']}")
  print(f"weights: {result['weight_bytes_full'] / 2**20:.1f} MiB -> "
        f"{result['weight_bytes_int8'] / 2**20:.1f} MiB")
  for a, b, rec in [(a, b, r) for a, b, r in zip(answers['full'], answers[args.mode], heldout)
                    if a != b][:5]:
    print(f"  differs on {rec.get('id')}: full {a!r} | {args.mode} {b!r}")
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
  main()
