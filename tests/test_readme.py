"""The README's Python snippet runs as written (a user copies it first)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
  with open(os.path.join(ROOT, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)
  assert len(blocks) == 1, 'the README holds one Python snippet'
  monkeypatch.chdir(tmp_path)              # built-in config names resolve from any directory
  exec(compile(blocks[0], 'README.md', 'exec'), {})
  loss, sequences = capsys.readouterr().out.strip().split('\n')
  # Random weights over the tiny 512-piece vocabulary: the loss is near ln(512) = 6.24.
  assert abs(float(loss) - 6.24) < 0.5
  rows = eval(sequences)
  assert len(rows) == 4 and all(1 <= len(r) <= 8 for r in rows)
