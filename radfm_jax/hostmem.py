"""How the host's C allocator serves XLA:CPU's buffers: the hardware preset's
`mesh.host_allocator`, applied by the `radfm-jax` command before JAX starts.

Why: XLA:CPU allocates the buffers of each execution with `malloc` and frees them when it ends.
glibc serves every block over 32 MiB with an `mmap` of its own and unmaps it at `free`, so each
train step faults its activations in afresh, 4 KiB at a time (most distributions give
transparent huge pages only to memory that asks for them, `madvise`): 1.1 GB of page faults and
0.4-0.6 s of kernel CPU time per `bench` step, ~10% of its wall time on an AMD EPYC
(docs/performance.md, "The host allocator").

Policies (`POLICIES`):
  'system'     glibc's defaults: nothing is set.
  'hugepages'  glibc asks for transparent huge pages for its blocks (`glibc.malloc.hugetlb=1`,
               glibc >= 2.35): a step faults its buffers in 2 MiB at a time, 512x fewer faults,
               and freed blocks still go back to the system. No effect where the host's
               transparent huge pages are `never`. The `cpu` preset's.
  'keep'       one heap for every thread, no `mmap` for large blocks and no trimming: a freed
               buffer stays mapped and the next step reuses it, so a step faults nothing. The
               process's resident memory stays at its peak, as an accelerator's BFC allocator
               does, and its threads share one arena (compiles were slower).

glibc reads these settings (environment variables) once, when the process starts, so only a
launcher can set them: `radfm-jax train` and `radfm-jax demo` restart themselves once with them
(`restart_with`) after reading the config and before anything touches JAX. A variable the user
already set is kept (theirs wins). A notebook, or another launcher, puts `environment(policy)`
into the environment of the process it starts; `describe` says what a process got (the train
loop prints it).
"""

from __future__ import annotations

import os
import re
import sys

# 64 GiB: a trim threshold no CPU training run's heap reaches, so glibc never gives the top back.
_NEVER_TRIM = str(64 << 30)

POLICIES: dict[str, dict[str, str]] = {
    'system': {},
    'hugepages': {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
    'keep': {
        'MALLOC_ARENA_MAX': '1',              # every thread in the main (brk) heap: a thread's
                                              # own arena maps any block over 64 MiB regardless
        'MALLOC_MMAP_MAX_': '0',              # no mmap-per-block: large blocks from the heap too
        'MALLOC_TRIM_THRESHOLD_': _NEVER_TRIM,
        'MALLOC_TOP_PAD_': str(1 << 30),      # grow the heap 1 GiB at a time (address space only)
    },
}

# Set in the restarted process, so a second restart is never attempted (whatever the user set).
_RESTARTED = 'RADFM_HOST_ALLOCATOR'
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def environment(policy: str) -> dict[str, str]:
  """The environment variables a process must start with for `policy` (glibc only)."""
  return dict(POLICIES.get(policy, {}))     # an unknown name: ConfigError from the config


def missing(policy: str, environ=None) -> dict[str, str]:
  """The variables of `policy` that `environ` (default: this process's) does not set at all;
  a variable set to any value, the user's choice, is not missing."""
  environ = os.environ if environ is None else environ
  return {k: v for k, v in environment(policy).items() if k not in environ}


def applies() -> bool:
  """The variables are glibc's: Linux processes only."""
  return sys.platform.startswith('linux')


def transparent_hugepages() -> str | None:
  """This host's transparent huge page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(_THP) as f:
      found = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return found.group(1) if found else None


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library this process runs on, None if it is not glibc."""
  try:
    found = re.fullmatch(r'glibc (\d+)\.(\d+).*', os.confstr('CS_GNU_LIBC_VERSION') or '')
  except (ValueError, OSError, AttributeError):
    return None
  return (int(found.group(1)), int(found.group(2))) if found else None


def restart_with(policy: str):
  """Replace this process (`os.execve`: same pid, same arguments, same stdio) by one started with
  `policy`'s variables, when some are missing; returns only if none are (or not on Linux, or
  already restarted once). Call it from a command-line entry point before JAX starts."""
  add = missing(policy)
  if not add or not applies() or os.environ.get(_RESTARTED):
    return
  env = {**os.environ, **add, _RESTARTED: policy}
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
  except OSError:
    return            # runs on with glibc's defaults; the loop's `describe` line says so


def describe(policy: str, environ=None, thp: str | None = None,
             glibc: tuple[int, int] | None = None) -> str:
  """One line for the run's log: what this process's allocator got against what the config
  asked for (`thp`: the host's transparent huge page mode, `glibc`: the C library's version; both
  read when not given)."""
  environ = os.environ if environ is None else environ
  want = environment(policy)
  head = f"host allocator: mesh.host_allocator='{policy}'"
  if not want:
    return f"{head} (glibc's defaults)"
  if not applies():
    return f'{head} applies to glibc (Linux) only; this process runs the system allocator'
  lack = missing(policy, environ)
  if lack:
    return (f"{head} was not applied: this process started without {' '.join(lack)} "
            f'(radfm-jax train / demo set them themselves; from Python, start the process with '
            f'{" ".join(f"{k}={v}" for k, v in want.items())})')
  line = f"{head} ({' '.join(f'{k}={environ.get(k)}' for k in want)})"
  if policy == 'hugepages':
    thp, glibc = thp or transparent_hugepages(), glibc or glibc_version()
    if glibc is not None and glibc < (2, 35):
      line += f'; no effect: glibc {glibc[0]}.{glibc[1]} has no glibc.malloc.hugetlb (>= 2.35)'
    elif thp == 'never':
      line += f'; no effect: transparent huge pages are {thp} on this host'
    else:
      line += f'; transparent huge pages: {thp or "unknown"}'
  return line
