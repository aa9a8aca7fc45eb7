"""Largest per-chip batch of a TPU preset that compiles within HBM: a search over `radfm-jax aot`.

    python benchmarks/fit_search.py --preset tpu_v5p_64 [--upper 40] [--model radfm_13b]
        [--attention xla] [--json benchmarks/fit_13b.jsonl] [-- extra aot overrides]

Seeds the bracket from the JSON lines already in --json (same topology, attention, remat policy
and text length): `lo` = the largest per-chip batch that compiled within HBM, `hi` = the smallest
that was refused or over HBM (--upper when none is recorded). It then compiles downwards from
hi - 1 until one fits, each compile a fresh `radfm-jax aot` process that appends its report to
--json. Downwards because libtpu refuses an over-HBM program in seconds while a fit takes minutes
(4-22 on a 2-core host), so the first fit found closes the bracket at the price of one long
compile. Prints the bracket: largest fit, smallest refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _chips(topology: str) -> int:
  chips = 1
  for d in topology.partition(':')[2].split('x'):
    chips *= int(d)
  return chips


def bracket(records, topology: str, attention: str, remat: str, text_len: int):
  """(largest per-chip batch that fit, smallest that did not) among matching records."""
  lo, hi = 0, None
  for r in records:
    if (r['topology'], r.get('attention', 'xla'), r['remat_policy'], r['text_len']) != (
        topology, attention, remat, text_len):
      continue
    b = int(r['per_chip_batch'])
    if r['fits']:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)
  return lo, hi


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', required=True, help='a tpu_* mesh preset of configs/hardware.py')
  p.add_argument('--model', default='radfm_13b')
  p.add_argument('--attention', default='xla')
  p.add_argument('--remat', default='nothing_saveable')
  p.add_argument('--text_len', type=int, default=2048)
  p.add_argument('--upper', type=int, default=None,
                 help='first per-chip batch assumed refused when --json records none')
  p.add_argument('--json', default=os.path.join(ROOT, 'benchmarks', 'fit_13b.jsonl'))
  p.add_argument('extra', nargs='*', help='more aot arguments, e.g. --config.model.x=y')
  args = p.parse_args(argv)

  sys.path.insert(0, ROOT)
  from configs.hardware import PRESETS
  topology = PRESETS[args.preset]['topology']
  chips = _chips(topology)
  records = []
  if os.path.exists(args.json):
    with open(args.json) as f:
      records = [json.loads(line) for line in f if line.strip()]
  lo, hi = bracket(records, topology, args.attention, args.remat, args.text_len)
  if hi is None:
    if args.upper is None:
      p.error(f'no refusal recorded for {topology} in {args.json}: pass --upper')
    hi = args.upper
  print(f'{args.preset} ({topology}, {chips} chips): fits at {lo}, refused at {hi}', flush=True)
  config = (f'configs/radfm.py:model={args.model},mesh={args.preset}')
  for per_chip in range(hi - 1, lo, -1):
    cmd = [sys.executable, '-m', 'radfm_jax.cli', 'aot', '--config', config,
           '--batch_2d', str(per_chip * chips), '--text_len', str(args.text_len),
           f'--config.model.attention={args.attention}',
           f'--config.model.remat_policy={args.remat}', '--json', args.json, *args.extra]
    print('$', ' '.join(cmd[2:]), flush=True)
    code = subprocess.call(cmd, cwd=ROOT)
    if code == 0:
      lo = per_chip
      break
    if code != 1:   # 1 = compiled or refused, does not fit; anything else is a crash
      print(f'aot exited {code} at per-chip batch {per_chip}; stopping', file=sys.stderr)
      return code
    hi = per_chip
  print(f'{args.preset}: largest per-chip batch that fits {lo}, smallest refused {hi}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
