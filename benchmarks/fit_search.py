"""Largest per-chip batch of a TPU preset that compiles within HBM: a search over `radfm-jax aot`.

    python benchmarks/fit_search.py --preset tpu_v5p_64 [--upper 40] [--model radfm_13b]
        [--attention xla] [--json benchmarks/fit_13b.jsonl] [-- extra aot overrides]
    python benchmarks/fit_search.py --table     # the fit tables of docs/performance.md from --json

Seeds the bracket from the JSON lines already in --json (same topology, attention, remat policy
and text length): `lo` = the largest per-chip batch that compiled within HBM, `hi` = the smallest
that was refused or over HBM. It then compiles downwards from hi - 1 (from --upper itself when no
refusal is recorded) until one fits, each compile a fresh `radfm-jax aot` process that appends its
report to --json. Downwards because libtpu refuses an over-HBM program in seconds while a fit takes minutes
(4-22 on a 2-core host), so the first fit found closes the bracket at the price of one long
compile. Prints the bracket: largest fit, smallest refusal.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from radfm_jax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _name(r) -> str:
  return f"{aot.accelerator_type(r['topology'])} ({r['devices']} chips)"


def _gib(b) -> str:
  return f'{b / 2 ** 30:.2f} GiB'


def _result(r) -> str:
  if r['fits']:
    return f"{_gib(r['peak_bytes'])}"
  need = f", needs {_gib(r['needed_bytes'])}" if r.get('needed_bytes') else ''
  return f'refused{need}'


def tables(records) -> str:
  """The two fit tables of docs/performance.md (markdown) from the JSON lines: every compile, then per topology
  and attention the largest per-chip batch that fit and the smallest refused."""
  lines = ['| topology | batch | attention | per-chip batch | compiler peak / chip | '
           'FLOPs / step (analytic) | compile | verdict |', '| --- ' * 8 + '|']
  for r in records:
    took = r['compile_s']
    took = f'{took / 60:.0f} min' if took >= 90 else f'{took:.0f} s'
    lines.append(f"| {_name(r)} | {r['kind'].upper()} | {r.get('attention', 'xla')} | "
                 f"{r['per_chip_batch']:g} ({r['global_batch']}) | {_result(r)} | "
                 f"{r['flops_per_step']:.2e} | {took} | "
                 f"{'fits' if r['fits'] else 'does not fit'} |")
  lines += ['', '| topology | attention | largest per-chip batch that fits | smallest refused | '
            'limit |', '| --- ' * 5 + '|']
  groups = {}
  for r in records:
    groups.setdefault((r['topology'], r.get('attention', 'xla')), []).append(r)
  order = lambda item: (item[0][0].split(':')[0], aot.chip_count(item[0][0]), item[0][1] != 'xla')
  for (topology, attention), rs in sorted(groups.items(), key=order):
    fits = [r for r in rs if r['fits']]
    refused = [r for r in rs if not r['fits']]
    best = max(fits, key=lambda r: r['per_chip_batch'], default=None)
    low = min(refused, key=lambda r: r['per_chip_batch'], default=None)
    lo = int(best['per_chip_batch']) if best else 0
    hi = int(low['per_chip_batch']) if low else None
    if hi is not None and hi == lo + 1:
      limit = f'**{lo}**'
    elif hi is None:
      limit = f'>= {lo} (no refusal compiled)'
    else:
      limit = f'{lo} to {hi - 1}'
    cell = lambda r: (f"{r['per_chip_batch']:g}: {_result(r)} ({r['kind'].upper()})" if r
                      else 'none compiled')
    lines.append(f'| {_name(rs[0])} | {attention} | {cell(best)} | {cell(low)} | {limit} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', help='a tpu_* hardware preset of radfm_jax/presets.py')
  p.add_argument('--table', action='store_true',
                 help='print the docs/performance.md tables of the JSON lines in --json and exit')
  p.add_argument('--model', default='radfm_13b')
  p.add_argument('--attention', default='xla')
  p.add_argument('--remat', default='nothing_saveable')
  p.add_argument('--text-len', type=int, default=2048)
  p.add_argument('--upper', type=int, default=None,
                 help='first per-chip batch assumed refused when --json records none')
  p.add_argument('--json', default=os.path.join(ROOT, 'benchmarks', 'fit_13b.jsonl'))
  p.add_argument('extra', nargs='*', help='more aot arguments, e.g. --config.model.x=y')
  args = p.parse_args(argv)

  from radfm_jax.data.store import read_jsonl     # [] when absent; errors name file and line
  from radfm_jax.presets import HARDWARE
  records = read_jsonl(args.json)
  if args.table:
    print(tables(records))
    return 0
  if not args.preset:
    p.error('--preset is required (or --table)')
  topology = HARDWARE[args.preset].get('mesh', {}).get('topology', '')
  chips = aot.chip_count(topology)
  lo, hi = bracket(records, topology, args.attention, args.remat, args.text_len)
  if hi is None:
    if args.upper is None:
      p.error(f'no refusal recorded for {topology} in {args.json}: pass --upper')
    first = args.upper      # not compiled yet: compile it too
    print(f'{args.preset} ({topology}, {chips} chips): fits at {lo}, no refusal recorded; '
          f'starting at {first}', flush=True)
  else:
    first = hi - 1
    print(f'{args.preset} ({topology}, {chips} chips): fits at {lo}, refused at {hi}', flush=True)
  config = (f'configs/radfm.py:model={args.model},mesh={args.preset}')
  for per_chip in range(first, lo, -1):
    cmd = [sys.executable, '-m', 'radfm_jax.cli.main', 'aot', '--config', config,
           '--batch-2d', str(per_chip * chips), '--text-len', str(args.text_len),
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
  if hi is None:
    print(f'{args.preset}: per-chip batch {lo} fits and nothing above it was refused: raise '
          '--upper')
    return 0
  print(f'{args.preset}: largest per-chip batch that fits {lo}, smallest refused {hi}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
