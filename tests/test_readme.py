"""Every Python block of the README runs as written (a user copies them first), each in a fresh
folder, and prints what the README says it does."""

import os
import re
import subprocess
import sys

import pytest

import conftest_data as cd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks() -> list[str]:
  with open(os.path.join(ROOT, 'README.md')) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)


def _run(block: str, folder, monkeypatch, capsys) -> list[str]:
  monkeypatch.chdir(folder)                # built-in config names resolve from any directory
  exec(compile(block, 'README.md', 'exec'), {'__name__': '__readme__'})
  return capsys.readouterr().out.strip().split('\n')


def test_readme_python_blocks_are_the_ones_tested():
  blocks = _blocks()
  assert len(blocks) == 2, 'a new README Python block needs its checks here'
  assert 'create_model' in blocks[0] and 'load_for_generation' in blocks[1]


def test_readme_model_block_runs(tmp_path, monkeypatch, capsys):
  loss, sequences = _run(_blocks()[0], tmp_path, monkeypatch, capsys)
  # Random weights over the tiny 512-piece vocabulary: the loss is near ln(512) = 6.24.
  assert abs(float(loss) - 6.24) < 0.5
  rows = eval(sequences)
  assert len(rows) == 4 and all(1 <= len(r) <= 8 for r in rows)


@pytest.mark.slow
def test_readme_scans_to_answer_block_runs(tmp_path):
  # In a fresh interpreter with one CPU device, as a user runs it (the suite has 8 fake devices).
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=cd.xla_flags(1),
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', _blocks()[1]], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().split('\n')
  losses = [line for line in lines if line.startswith('loss ')]
  assert len(losses) == 1, lines
  first, last = (float(x) for x in losses[0].split()[1::2])
  assert abs(first - 6.24) < 0.6 and last < first           # 20 steps on 6 samples: it learns
  assert isinstance(lines[-1], str)                           # the answer (4 tokens at most)
  # The run folder is self-contained: its checkpoint, config and the tokenizer it used.
  assert (tmp_path / 'run' / 'tokenizer.model').read_bytes() == \
      (tmp_path / 'tokenizer.model').read_bytes()
  assert sorted(os.listdir(tmp_path / 'store' / 'volumes')) != []
