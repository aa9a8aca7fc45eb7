"""The repository stands alone: no file points outside it, and a fresh clone with nothing beside it
passes the conversion tests (their official key list travels as tests/data, docs/original.md
section 10)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ('radfm_jax', 'tests', 'docs', 'notebooks', 'configs', 'benchmarks')
# Assembled from parts so that this file does not contain them literally: the sibling folder the
# project once read its reference from, and this machine's work tree.
NEEDLES = ('..' + '/' + 'shared', '/' + 'work' + '/')
CONVERT_TESTS = ('tests/test_convert_keymap.py', 'tests/test_convert_roundtrip.py')


def _git(*args: str, cwd: str = ROOT) -> str:
  """stdout of `git *args` in `cwd`; a clear failure when git or the checkout is missing."""
  if shutil.which('git') is None:
    pytest.fail('git is not on PATH: the self-containment tests need git to list and clone the '
                'repository')
  proc = subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.fail(f'`git {" ".join(args)}` failed in {cwd} (the tests must run from a git checkout '
                f'of radfm-jax): {proc.stderr.strip()}')
  return proc.stdout


def _repo_files() -> list[str]:
  """Tracked and untracked-but-not-ignored files under SCANNED, relative to ROOT."""
  out = _git('ls-files', '-z', '--cached', '--others', '--exclude-standard', '--', *SCANNED)
  return [p for p in out.split('\0') if p and os.path.isfile(os.path.join(ROOT, p))]


def test_no_file_points_outside_the_repository():
  # the checkout's own absolute path is machine-specific too
  needles = [n.encode() for n in (*NEEDLES, ROOT + os.sep)]
  files = _repo_files()
  assert 'tests/data/radfm_state_dict_keys.tsv' in files
  assert 'docs/original.md' in files
  hits = []
  for rel in files:
    with open(os.path.join(ROOT, rel), 'rb') as f:
      data = f.read()
    for needle in needles:
      for m in re.finditer(re.escape(needle), data):
        line = data.count(b'\n', 0, m.start()) + 1
        hits.append(f'{rel}:{line}: {needle.decode()}')
  assert not hits, 'paths outside the repository:\n' + '\n'.join(hits)


@pytest.mark.slow
def test_fresh_clone_passes_the_conversion_tests(tmp_path):
  head = _git('rev-parse', 'HEAD').strip()
  clone = str(tmp_path / 'radfm-jax')        # tmp_path is empty: nothing lies beside the clone
  _git('clone', '-q', '--no-hardlinks', ROOT, clone, cwd=str(tmp_path))
  _git('checkout', '-q', '--detach', head, cwd=clone)
  assert _git('rev-parse', 'HEAD', cwd=clone).strip() == head
  assert sorted(os.listdir(tmp_path)) == ['radfm-jax']

  env = dict(os.environ, PYTHONPATH=clone)
  env.pop('PYTEST_ADDOPTS', None)            # the outer run's options (e.g. -n) are not the clone's
  where = subprocess.run([sys.executable, '-c', 'import radfm_jax; print(radfm_jax.__file__)'],
                         cwd=clone, env=env, capture_output=True, text=True)
  assert where.returncode == 0, where.stderr
  # the clone's package, not an installed copy of some other checkout
  assert os.path.realpath(where.stdout.strip()).startswith(os.path.realpath(clone) + os.sep)

  proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:xdist', '-p',
                         'no:cacheprovider', *CONVERT_TESTS], cwd=clone, env=env,
                        capture_output=True, text=True, timeout=1800)
  log = proc.stdout[-4000:] + proc.stderr[-2000:]
  assert proc.returncode == 0, log
  summary = proc.stdout.strip().splitlines()[-1]
  passed = re.search(r'(\d+) passed', summary)
  assert passed and int(passed.group(1)) > 0, log
  assert not re.search(r'\d+ (failed|errors?)\b', summary), log
