"""The host allocator policy (`mesh.host_allocator`, radfm_jax/hostmem.py): what a process must
start with, the restart that gives it that, and what it buys (no page faults for a buffer freed
and allocated again), measured in real processes."""

import json
import os
import subprocess
import sys

import pytest

from radfm_jax import hostmem

KEEP = {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(64 << 30),
        'MALLOC_TOP_PAD_': str(1 << 30)}
HUGE = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}

linux_only = pytest.mark.skipif(not hostmem.applies(), reason='glibc malloc settings: Linux only')


def test_policies_and_what_a_process_lacks():
  assert hostmem.environment('system') == {} and hostmem.environment('keep') == KEEP
  assert hostmem.environment('hugepages') == HUGE
  assert hostmem.missing('keep', {}) == KEEP
  # A variable the user set, to any value, is theirs: not missing, not overridden.
  assert hostmem.missing('keep', {'MALLOC_ARENA_MAX': '4'}) == {
      k: v for k, v in KEEP.items() if k != 'MALLOC_ARENA_MAX'}
  assert hostmem.missing('keep', KEEP) == {} and hostmem.missing('system', {}) == {}


@linux_only
def test_describe_says_what_the_process_got():
  assert hostmem.describe('system', {}) == "host allocator: mesh.host_allocator='system' (glibc's defaults)"
  got = hostmem.describe('keep', KEEP)
  assert got == ("host allocator: mesh.host_allocator='keep' (MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 "
                 'MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824)')
  assert hostmem.describe('hugepages', HUGE, thp='madvise', glibc=(2, 36)) == (
      "host allocator: mesh.host_allocator='hugepages' (GLIBC_TUNABLES=glibc.malloc.hugetlb=1); "
      'transparent huge pages: madvise')
  assert hostmem.describe('hugepages', HUGE, thp='never', glibc=(2, 36)).endswith(
      '(GLIBC_TUNABLES=glibc.malloc.hugetlb=1); no effect: transparent huge pages are never on '
      'this host')
  assert hostmem.describe('hugepages', HUGE, thp='madvise', glibc=(2, 31)).endswith(
      '; no effect: glibc 2.31 has no glibc.malloc.hugetlb (>= 2.35)')
  lack = hostmem.describe('keep', {'MALLOC_ARENA_MAX': '1'})
  assert lack.startswith("host allocator: mesh.host_allocator='keep' was not applied: this "
                         'process started without MALLOC_MMAP_MAX_ MALLOC_TRIM_THRESHOLD_ '
                         'MALLOC_TOP_PAD_ (radfm-jax train / demo set them themselves')
  assert 'MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0' in lack and '\n' not in lack
  assert hostmem.transparent_hugepages() in ('always', 'madvise', 'never', None)
  assert hostmem.glibc_version() is None or hostmem.glibc_version() >= (2, 17)


# A process that restarts itself with a policy, then allocates, fills and frees a 256 MiB block
# four times (glibc's malloc, as XLA:CPU's buffers) and reports the minor page faults of each.
PROBE = r'''
import ctypes, json, os, resource, sys
from radfm_jax import hostmem
hostmem.restart_with(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 256 << 20, []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'pid': os.getpid(), 'argv': sys.argv[1:], 'faults': faults,
                  'env': {k: os.environ.get(k) for k in sorted(set().union(
                      *hostmem.POLICIES.values(), ['RADFM_HOST_ALLOCATOR']))}}))
'''


def _probe(policy: str, env: dict) -> dict:
  proc = subprocess.run([sys.executable, '-c', PROBE, policy], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 1, proc.stdout          # the restart printed nothing of its own
  return json.loads(lines[0])


def _env_of(got: dict) -> dict:
  return {k: v for k, v in got['env'].items() if v is not None}


@linux_only
def test_each_policy_restarts_once_and_cuts_the_faults_of_a_reused_buffer():
  env = {k: v for k, v in os.environ.items()
         if k not in set().union(*hostmem.POLICIES.values(), ['RADFM_HOST_ALLOCATOR'])}
  thp = hostmem.transparent_hugepages()
  system = _probe('system', env)
  # 'system': no restart; glibc maps and unmaps the block each time, so every fill faults it in
  # again: 65536 pages of 4 KiB (the kernel backs it with huge pages itself only on 'always').
  assert _env_of(system) == {}
  if thp != 'always':
    assert all(f >= 65536 for f in system['faults']), system
  # 'keep': restarted with the policy (same arguments); the block stays in the heap after the
  # first fill, so the next three fault (almost) nothing.
  keep = _probe('keep', env)
  assert _env_of(keep) == {**KEEP, 'RADFM_HOST_ALLOCATOR': 'keep'} and keep['argv'] == ['keep']
  assert keep['faults'][0] > 100 and max(keep['faults'][1:]) < 100, keep
  # 'hugepages': still mapped afresh at every fill, but in 2 MiB pages where the host allows
  # transparent huge pages for memory that asks: a few hundred faults (640 here) for 65536.
  huge = _probe('hugepages', env)
  assert _env_of(huge) == {**HUGE, 'RADFM_HOST_ALLOCATOR': 'hugepages'}
  if thp == 'madvise' and (hostmem.glibc_version() or (0, 0)) >= (2, 35):
    assert max(huge['faults']) < min(system['faults']) / 20, (huge, system)
  # A variable the user set is kept, and the restart adds only the others.
  mine = _probe('keep', {**env, 'MALLOC_ARENA_MAX': '2'})
  assert _env_of(mine) == {**KEEP, 'MALLOC_ARENA_MAX': '2', 'RADFM_HOST_ALLOCATOR': 'keep'}
