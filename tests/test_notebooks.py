"""The notebooks run top to bottom (nbclient) and produce the values they claim.

The kernel is this interpreter (`sys.executable`), registered in a temporary kernelspec folder put
first on JUPYTER_PATH, so the run never depends on user-level kernelspecs or on `python` on PATH.
"""

import json
import os
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
pytest.importorskip('matplotlib')

# One worker runs the whole module, so the module fixtures are built once (make test: loadgroup).
pytestmark = pytest.mark.xdist_group('notebooks')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'notebooks')
KERNEL = 'radfm-jax-test'


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  spec_dir = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'radfm-jax (test)', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setenv('PYTHONPATH', ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return tmp_path


def _execute(name: str, timeout: int = 600):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=timeout,
                                   resources={'metadata': {'path': ROOT}})
  client.execute()
  return nb


def _stdout(nb) -> str:
  return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.get('outputs', []) if o.get('name') == 'stdout')


def _cleared(nb):
  out = nbformat.from_dict(nb)
  for cell in out.cells:
    if cell.cell_type == 'code':
      cell.outputs, cell.execution_count = [], None
    cell.metadata = {}
  out.metadata = {k: v for k, v in out.metadata.items() if k in ('kernelspec', 'language_info')}
  out.metadata['language_info'] = {'name': 'python'}
  return out


def _outputs(cell, mime: str) -> list:
  """The cell's outputs of one kind: 'image/png' (a figure) or 'stdout' (printed text)."""
  if mime == 'stdout':
    return [o for o in cell.get('outputs', []) if o.get('name') == 'stdout']
  return [o for o in cell.get('outputs', []) if mime in o.get('data', {})]


def test_notebooks_are_built_and_carry_the_outputs_of_a_run():
  """The committed quickstart is build_quickstart.build() plus the outputs of a real run (GitHub
  shows a scan, a loss curve and answers without running it)."""
  sys.path.insert(0, NOTEBOOKS)
  try:
    import build_quickstart
  finally:
    sys.path.remove(NOTEBOOKS)
  on_disk = nbformat.read(os.path.join(NOTEBOOKS, 'quickstart.ipynb'), as_version=4)
  nbformat.validate(on_disk)
  assert _cleared(on_disk) == build_quickstart.build()   # regenerate with the script after edits
  code = [c for c in on_disk.cells if c.cell_type == 'code']
  assert all(c.execution_count is not None for c in code), 'run build_quickstart.py --execute'
  loss_cell = next(c for c in code if 'read_metrics' in c.source)
  scan_cell = next(c for c in code if 'sagittal' in c.source)
  assert _outputs(loss_cell, 'image/png') and _outputs(scan_cell, 'image/png')
  printed = ''.join(o['text'] for c in code for o in _outputs(c, 'stdout'))
  assert 'checkpoint' in printed and 'loss ' in printed      # a trained run, not the random model
  answer_cell = next(c for c in code if 'api.generate(' in c.source)
  assert _outputs(answer_cell, 'stdout')
  convert = nbformat.read(os.path.join(NOTEBOOKS, 'convert.ipynb'), as_version=4)
  assert 'round trip exact for' in ''.join(
      o.get('text', '') for c in convert.cells if c.cell_type == 'code' for o in c.outputs)


def test_quickstart_runs(kernel_env, monkeypatch):
  from radfm_jax.eval import metrics
  out = kernel_env / 'out'
  monkeypatch.setenv('RADFM_CHECKPOINT', 'none')        # the random tiny model, whatever is on disk
  monkeypatch.setenv('RADFM_NOTEBOOK_OUT', str(out))
  _execute('quickstart.ipynb')
  results = json.loads((out / 'results.json').read_text())
  assert results['source'] == 'random'
  # anatomical.nii is 33 x 41 x 25 -> one image, tiny buckets: 64 x 64 in plane, depth 16 (max)
  assert results['scan_shape'] == [1, 33, 41, 25]
  assert results['image_batch_shape'] == [1, 1, 3, 64, 64, 16]
  lo, hi = results['pixel_range']
  assert lo == 0.0 and 0.9 < hi <= 1.0
  assert isinstance(results['answer'], str) and len(results['answers']) == 2
  want = metrics.compute_metrics(results['answers'], ['No', 'A mass in the brain.'],
                                 ['closed', 'open'])
  assert results['metrics'] == pytest.approx(want, nan_ok=True)
  assert (out / 'slices.png').stat().st_size > 1000


def test_convert_notebook_runs(kernel_env, monkeypatch):
  pytest.importorskip('torch')
  pytest.importorskip('safetensors')
  temp = kernel_env / 'temp'        # the kernel's temporary folder: the notebook leaves it empty
  temp.mkdir()
  monkeypatch.setenv('TMPDIR', str(temp))
  nb = _execute('convert.ipynb')
  assert 'round trip exact for' in _stdout(nb)
  assert list(temp.iterdir()) == []
