"""Where an XLA:CPU program's time goes: a `jax.profiler` trace parsed per HLO op, each op put
in a category from the compiled HLO text.

The trace (`*.xplane.pb`, read with `jax.profiler.ProfileData`) holds one event per executed
HLO op (stat `hlo_op`, `hlo_module`) on the thread that ran it. A `while` (the layer scan, the
decode loop) is an event that encloses its body's ops on the same thread, so each op's *self* time
(its duration less the events nested in it) is what is summed: the loops' own bookkeeping lands in
'loop control' and nothing is counted twice. Ops that run concurrently on several threads are
all counted, so the sum can exceed the wall time of a step; the printout says by how much.

Categories (from the opcodes inside each fusion):
  matmul/conv        dot, convolution (incl. the XNNPACK / oneDNN fusions that wrap them), and
                     custom calls (the decode's panel-kernel products, generate.cpu_product)
  softmax            exponential with a reduce in the same op
  reductions/norms   reduce, reduce-window, rsqrt without a dot
  copies/transposes  only data movement: copy, transpose, slice, concatenate, gather, pad, ...
  collectives        all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  elementwise        every other fusion or single op
  loop control       self time of while / conditional / call
  other              an op the HLO text does not name (should stay ~0)
"""

from __future__ import annotations

import collections
import glob
import os
import re

import jax

CATEGORIES = ('matmul/conv', 'softmax', 'reductions/norms', 'copies/transposes', 'collectives',
              'elementwise', 'loop control', 'other')
_MOVE = {'fusion', 'copy', 'transpose', 'bitcast', 'reshape', 'broadcast', 'slice', 'dynamic-slice',
         'dynamic-update-slice', 'concatenate', 'pad', 'gather', 'scatter', 'parameter', 'tuple',
         'get-tuple-element', 'constant', 'iota', 'reverse', 'copy-start', 'copy-done'}
_COLLECTIVE = {'all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
               'all-reduce-start', 'all-reduce-done', 'all-gather-start', 'all-gather-done',
               'collective-permute-start', 'collective-permute-done'}
_CONTROL = {'while', 'conditional', 'call'}
# `%name = <shape> opcode(` ; the shape may be a tuple with spaces, so match lazily up to the
# first `word(` after the `=`.
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)')
_COMP = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_IS_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s')


def parse_hlo(text: str) -> dict[str, set[str]]:
  """Compiled HLO text -> {instruction name: opcodes it runs}; a fusion (or custom call with a
  called computation) maps to every opcode in its called computations, recursively; a
  while / conditional / call maps to its own opcode only (its body's ops are events of their own).
  """
  comps: dict[str, list[tuple[str, str, list[str]]]] = {}
  current = None
  for line in text.splitlines():
    if not _IS_INSTR.match(line):
      m = _COMP.match(line)
      current = m.group(1) if m else None
      if current:
        comps[current] = []
      continue
    m = _INSTR.match(line)
    if m:
      called = []
      for c in _CALLS.findall(line):
        called += [x.strip().lstrip('%') for x in c.split(',') if x.strip()]
      comps[current].append((m.group(1), m.group(2), called))

  memo: dict[str, set[str]] = {}

  def comp_ops(name):
    if name not in memo:
      memo[name] = set()
      ops = set()
      for _, opcode, called in comps.get(name, ()):
        ops.add(opcode)
        for c in called:
          ops |= comp_ops(c)
      memo[name] = ops
    return memo[name]

  out = {}
  for instrs in comps.values():
    for name, opcode, called in instrs:
      ops = {opcode}
      if opcode not in _CONTROL:
        for c in called:
          ops |= comp_ops(c)
      out[name] = ops
  return out


def category(ops: set[str] | None) -> str:
  """The category (one of CATEGORIES) of an op running `ops`."""
  if not ops:
    return 'other'
  if ops & _CONTROL:
    return 'loop control'
  if ops & _COLLECTIVE:
    return 'collectives'
  if ops & {'dot', 'convolution', 'custom-call'}:
    return 'matmul/conv'
  if 'exponential' in ops and 'reduce' in ops:
    return 'softmax'
  if ops & {'reduce', 'reduce-window', 'rsqrt'}:
    return 'reductions/norms'
  if ops <= _MOVE:
    return 'copies/transposes'
  return 'elementwise'


def self_times(trace_dir: str, module: str | None = None) -> collections.Counter:
  """{(program id, hlo op name): summed self time in seconds} over every `*.xplane.pb` under
  `trace_dir` (events of modules whose name contains `module`, all when None). The program id
  is XLA's module id: the `module_NNNN` of an `--xla_dump_to` dump."""
  total: collections.Counter = collections.Counter()
  for path in glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True):
    data = jax.profiler.ProfileData.from_file(path)
    for plane in data.planes:
      for line in plane.lines:
        events = []
        for e in line.events:
          stats = dict(e.stats)
          if 'hlo_op' in stats and (module is None or module in str(stats.get('hlo_module'))):
            events.append((e.start_ns, e.start_ns + e.duration_ns,
                           (int(stats.get('program_id', -1)), stats['hlo_op'])))
        events.sort(key=lambda ev: (ev[0], -ev[1]))
        stack: list[list] = []                  # [end, key, self_ns] of enclosing events
        for start, end, key in events:
          while stack and start >= stack[-1][0]:
            _, done, ns = stack.pop()
            total[done] += ns * 1e-9
          if stack:
            stack[-1][2] -= end - start         # a nested event is not its parent's self time
          stack.append([end, key, end - start])
        for _, done, ns in stack:
          total[done] += ns * 1e-9
  return total


def dump_flags(dump_dir: str, module_re: str) -> str:
  """XLA_FLAGS that write the optimised HLO text of modules matching `module_re` (set before
  the backend starts; `hlo_from_dump` reads them back)."""
  return (f' --xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$'
          f' --xla_dump_hlo_module_re={module_re}')


def hlo_from_dump(dump_dir: str) -> dict[int, dict[str, set[str]]]:
  """{program id: parse_hlo of its optimised HLO} from an `--xla_dump_to` folder."""
  out = {}
  for path in glob.glob(os.path.join(dump_dir, 'module_*.cpu_after_optimizations.txt')):
    pid = int(os.path.basename(path).split('.')[0].split('_')[1])
    with open(path) as f:
      out[pid] = parse_hlo(f.read())
  return out


def by_category(times: dict, hlo: dict[int, dict[str, set[str]]]) -> dict[str, float]:
  """Summed seconds per category (every category present, 0.0 when none); `times` as
  `self_times` gives them, `hlo` {program id: {op: opcodes}}."""
  out = dict.fromkeys(CATEGORIES, 0.0)
  for (pid, name), seconds in times.items():
    out[category(hlo.get(pid, {}).get(name))] += seconds
  return out


def profile(fn, args, trace_dir: str, steps: int = 3):
  """Run `fn(*args)` `steps` times under a trace (after one untraced warm-up call).

  Returns (per-step self seconds per (program id, op), per-step wall seconds,
  {program id: {op: opcodes}}) for the module `fn` compiles to (`fn`: a `jax.jit` function)."""
  import time
  jax.block_until_ready(fn(*args))
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(fn(*args))
    wall = (time.perf_counter() - start) / steps
  text = fn.lower(*args).compile().as_text()
  module = text.split('HloModule ', 1)[1].split(',', 1)[0].split()[0]
  times = {k: v / steps for k, v in self_times(trace_dir, module).items()}
  ops = parse_hlo(text)
  return times, wall, {pid: ops for pid, _ in times}


def report(cats: dict[str, float], wall: float, label: str = 'step', top: dict | None = None,
           hlo: dict | None = None, count: int = 12) -> str:
  """The printout: categories (ms per `label`, % of the summed op time), the summed op time
  against the wall time, and the `count` longest ops of `top` (as `self_times` keys them)."""
  summed = sum(cats.values())
  lines = [f'profile (XLA:CPU trace, self time per HLO op, per {label}): ops sum '
           f'{summed * 1e3:.1f} ms vs wall {wall * 1e3:.1f} ms ({summed / wall:.2f}x; > 1 where '
           'ops ran concurrently, < 1 is runtime overhead between ops)']
  for name, seconds in sorted(cats.items(), key=lambda kv: -kv[1]):
    lines.append(f'  {name:<18} {seconds * 1e3:9.2f} ms {100 * seconds / summed:6.1f}%')
  if top:
    lines.append(f'  top {count} ops:')
    for (pid, name), seconds in sorted(top.items(), key=lambda kv: -kv[1])[:count]:
      cat = category((hlo or {}).get(pid, {}).get(name))
      lines.append(f'    {name:<40} {cat:<18} {seconds * 1e3:8.2f} ms')
  return '\n'.join(lines)
