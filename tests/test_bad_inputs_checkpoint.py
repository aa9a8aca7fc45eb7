"""Training checkpoints under faults: a table of corruptions of real files of the latest step of a
real tiny training run (Orbax state, data-iterator state, config, metadata), each with its outcome:
the run falls back to the newest intact step (one line naming step, file and reason; the restored
values equal that step's), or restores the latest step unharmed; with `fallback=False`
(`radfm-jax train --no-fallback`) the same line is an error (exit 2). Also the Grain iterator's
state file and the CLI end to end.
"""

import glob
import json
import os
import shutil

import grain
import jax
import numpy as np
import pytest

from radfm_jax.checkpoint import Checkpointer
from radfm_jax.checkpoint.train_state import CheckpointRestoreError
from radfm_jax.cli.main import main
from radfm_jax.config import load_config
from radfm_jax.train import loop

# One worker: the module's real training run (`run`) is made once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group('bad_inputs_checkpoint')

SPEC = 'configs/radfm.py:model=tiny,mesh=cpu'
OVERRIDES = ['data.store=synthetic', 'data.batch_size_2d=8', 'train.synthetic_length=48',
             'train.steps=4',
             'train.warmup_steps=1', 'train.learning_rate=1e-3', 'train.checkpoint_every=2',
             'train.log_every=1', 'train.async_checkpoint=False', 'train.tensorboard=False']


def _cfg():
  return load_config(SPEC, OVERRIDES)


def _numpy(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A real 4-step tiny run with checkpoints at steps 2 and 4, and each step's values."""
  workdir = str(tmp_path_factory.mktemp('run'))
  result = loop.train(_cfg(), workdir, progress=False)
  assert result.step == 4 and result.last_checkpoint == 4
  abs_state = loop.build(_cfg())[4]
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  values = {step: _numpy(ckpt.restore(step, abs_state)[0]) for step in (2, 4)}
  ckpt.close()
  return workdir, result, values, abs_state


def _copy(run, tmp_path) -> str:
  """A fresh copy of the run's checkpoints/ folder to corrupt."""
  dst = str(tmp_path / 'checkpoints')
  shutil.copytree(os.path.join(run[0], 'checkpoints'), dst)
  return dst


# ------------------------------------------------------------------------------------------------
# Faults: each takes the step folder, damages one real file, returns its path


def _truncate(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])
  return path


def _largest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*')),
             key=os.path.getsize)


def truncate(rel):
  def fault(step_dir):
    return _truncate(os.path.join(step_dir, rel))
  fault.__name__ = f'truncate {rel}'
  return fault


def empty(rel):
  def fault(step_dir):
    path = os.path.join(step_dir, rel)
    open(path, 'wb').close()
    return path
  return fault


def truncate_array_data(step_dir):
  return _truncate(_largest_data_file(step_dir))


def delete_array_data(step_dir):
  path = _largest_data_file(step_dir)
  os.remove(path)
  return path


def delete(rel):
  def fault(step_dir):
    path = os.path.join(step_dir, rel)
    os.remove(path)
    return path
  return fault


def garble_array_data(step_dir):
  """64 bytes flipped inside an array data file; its length stays right."""
  path = _largest_data_file(step_dir)
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 3, len(data) // 3 + 64):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))
  return path


# (name, fault, outcome, what the line must name besides step 4: the file or a phrase)
FALLBACK, INTACT = 'falls back to step 2', 'restores step 4'
def C(name, fault, outcome, names, marks=()):
  return pytest.param(fault, outcome, names, id=name, marks=marks)


CASES = [
    C('state_metadata_truncated', truncate('state/_METADATA'), FALLBACK, 'state/_METADATA'),
    C('array_data_truncated', truncate_array_data, FALLBACK, 'local file'),
    C('array_data_deleted', delete_array_data, FALLBACK, 'local file'),
    C('ocdbt_manifest_truncated', truncate('state/manifest.ocdbt'), FALLBACK, 'manifest.ocdbt'),
    C('array_metadatas_truncated', truncate('state/array_metadatas/process_0'), FALLBACK,
      'state/array_metadatas/process_0'),
    C('iterator_state_truncated', truncate('data/metadata'), FALLBACK, 'data/metadata'),
    C('iterator_state_empty', empty('data/metadata'), FALLBACK, 'data/metadata'),
    C('config_truncated', truncate('config/metadata'), FALLBACK, 'config/metadata'),
    C('checkpoint_metadata_truncated', truncate('_CHECKPOINT_METADATA'), INTACT, None),
    C('sharding_file_truncated', truncate('state/_sharding'), INTACT, None),
    C('commit_marker_deleted', delete('commit_success.txt'), INTACT, None),
    # Known limit, so an expected failure, but only of one kind: Orbax zarr chunks carry no
    # checksum, so garbled bytes of the right length usually restore as other values (the
    # restore raises nothing: pytest.raises fails, DID NOT RAISE). When the flipped bytes land on
    # a compressed chunk's framing (it depends on the file's layout, which varies between runs),
    # the restore fails and the case must then pass as every other corruption does; any other
    # error is a real failure.
    C('array_data_garbled', garble_array_data, FALLBACK, 'local file', marks=pytest.mark.xfail(
        strict=False, raises=pytest.fail.Exception, reason='usually not detected: Orbax zarr '
        'chunks carry no checksum, so garbled bytes of the right length restore as other values')),
]


@pytest.mark.slow     # the module's real training run takes ~1-3 min on a shared 2-core machine
@pytest.mark.parametrize('fault,outcome,names', CASES)
def test_corrupt_latest_step(fault, outcome, names, run, tmp_path):
  _, _, values, abs_state = run
  root = _copy(run, tmp_path)
  fault(os.path.join(root, '4'))
  cfg = _cfg()
  if outcome == FALLBACK:
    # --no-fallback: one line naming step 4, the file and the reason; nothing moved
    ckpt = Checkpointer(root, async_save=False)
    with pytest.raises(CheckpointRestoreError) as err:
      ckpt.restore_latest(abs_state, loop.make_data(cfg), fallback=False)
    message = str(err.value)
    assert '\n' not in message and message.startswith('checkpoint step 4: '), message
    assert names in message and root in message and '--no-fallback' in message, message
    assert os.path.isdir(os.path.join(root, '4'))
    ckpt.close()
  ckpt, lines = Checkpointer(root, async_save=False), []
  data = loop.make_data(cfg)
  step, state, config = ckpt.restore_latest(abs_state, data, log=lines.append)
  want = 2 if outcome == FALLBACK else 4
  assert step == want and data.get_state() == {'index': want}
  assert config['train']['steps'] == 4
  for a, b in zip(_numpy(state), values[want]):
    np.testing.assert_array_equal(a, b)
  if outcome == FALLBACK:
    assert len(lines) == 2, lines
    assert lines[0].startswith('checkpoint step 4: ') and names in lines[0], lines
    assert lines[0].endswith('; trying the previous step'), lines
    assert lines[1] == (f'restored checkpoint step 2 of {root} instead (the newest intact step); '
                        f'moved step 4 to {root}/4.corrupt')
    assert sorted(os.listdir(root)) == ['2', '4.corrupt', 'config.json']   # kept, not deleted
    assert ckpt.all_steps() == [2]
  else:
    assert lines == []
  ckpt.close()


@pytest.mark.slow
def test_no_step_restores(run, tmp_path):
  """Every step corrupt: an error listing each, never a silent fresh start, and nothing moved
  (a config that matches no step fails them all the same way)."""
  root = _copy(run, tmp_path)
  for step in ('2', '4'):
    truncate('state/_METADATA')(os.path.join(root, step))
  ckpt = Checkpointer(root, async_save=False)
  with pytest.raises(CheckpointRestoreError) as err:
    ckpt.restore_latest(run[3], loop.make_data(_cfg()), log=lambda line: None)
  ckpt.close()
  message = str(err.value)
  assert message.startswith(f'no checkpoint step in {root} restores: ') and '\n' not in message
  assert f'checkpoint step 4: {root}/4/state/_METADATA: does not parse' in message
  assert f'checkpoint step 2: {root}/2/state/_METADATA: does not parse' in message
  assert sorted(os.listdir(root)) == ['2', '4', 'config.json']     # nothing moved


def test_grain_iterator_state_file(tmp_path):
  """A Grain iterator's own state file (data/process_0-of-1.json), truncated: named, and the
  fallback puts the iterator at the previous step's position."""
  def iterator():
    ds = grain.MapDataset.range(100).seed(3).shuffle().map(lambda x: {'x': np.int64(x)})
    return iter(ds.to_iter_dataset())
  state = {'w': np.arange(4.0, dtype=np.float32)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  it = iterator()
  ckpt = Checkpointer(str(tmp_path / 'ck'), async_save=False)
  expected = {}
  for step in (1, 2):
    next(it)
    ckpt.save(step, state, it, {'step': step})
    probe = iterator()
    for _ in range(step):
      next(probe)
    expected[step] = [int(next(probe)['x']) for _ in range(3)]
  ckpt.close()
  (bad,) = glob.glob(str(tmp_path / 'ck' / '2' / 'data' / '*.json'))
  _truncate(bad)
  ckpt = Checkpointer(str(tmp_path / 'ck'), async_save=False)
  with pytest.raises(CheckpointRestoreError) as err:
    ckpt.restore_latest(abstract, iterator(), fallback=False)
  assert f'checkpoint step 2: {bad}: does not parse' in str(err.value)
  fresh, lines = iterator(), []
  step, _, config = ckpt.restore_latest(abstract, fresh, log=lines.append)
  ckpt.close()
  assert (step, config) == (1, {'step': 1}) and bad in lines[0]
  assert [int(next(fresh)['x']) for _ in range(3)] == expected[1]


@pytest.mark.slow
def test_cli_no_fallback_and_fallback(run, tmp_path, capsys):
  """`radfm-jax train --no-fallback` on a corrupt latest step: exit 2, one line naming the file.
  Without the flag the run resumes from step 2 and reproduces the uninterrupted run's losses."""
  workdir = tmp_path / 'work'
  workdir.mkdir()
  root = _copy(run, workdir)
  bad = truncate('data/metadata')(os.path.join(root, '4'))
  argv = ['train', '--config', SPEC, '--workdir', str(workdir), '--no-progress']
  argv += [f'--config.{o}' for o in OVERRIDES]
  rc = main(argv + ['--no-fallback'])
  err = capsys.readouterr().err.strip().splitlines()
  # the start-up summary, then the error as the one last line (no traceback)
  assert rc == 2 and not any('Traceback' in line for line in err), err
  assert err[-1].startswith('radfm-jax train: checkpoint step 4: ' + bad), err
  assert sum('checkpoint step 4' in line for line in err) == 1, err
  rc = main(argv)
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  assert f'checkpoint step 4: {bad}: does not parse' in captured.err
  assert f'restored checkpoint step 2 of {root} instead' in captured.err
  summary = json.loads(captured.out.strip().splitlines()[-1])
  assert summary['step'] == 4 and summary['checkpoint'] == 4
  assert summary['last_loss'] == run[1].losses[4]
  assert sorted(os.listdir(root)) == ['2', '4', '4.corrupt', 'config.json']


@pytest.mark.slow
def test_load_names_the_corrupt_file(run, tmp_path):
  """`checkpoint.load` / `LeafReader` (generate, eval, to-torch) on a corrupt latest step: one
  line naming the file, no fallback (they read the step they are asked for)."""
  from radfm_jax import checkpoint
  root = _copy(run, tmp_path)
  bad = truncate('state/_METADATA')(os.path.join(root, '4'))
  for read in (checkpoint.load, checkpoint.LeafReader):
    with pytest.raises(CheckpointRestoreError) as err:
      read(root)
    assert bad in str(err.value) and '\n' not in str(err.value), str(err.value)
  model, _ = checkpoint.load(root, step=2)          # the intact step still loads
  pristine, _ = checkpoint.load(os.path.join(run[0], 'checkpoints'), step=2)
  np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]),
                                np.asarray(pristine.fc.kernel[...]))


@pytest.mark.slow
def test_program_says_one_line_for_cut_array_data(run, tmp_path):
  """`radfm-jax generate` (the program) on a step whose array data files are cut short: exit 2 and
  exactly one stderr line. Orbax aborts the restore at the first failing read; the reads still
  in flight and the abandoned tasks used to print their tracebacks around that line (hundreds of
  lines, 'Event loop is closed', 'Task exception was never retrieved')."""
  import subprocess
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  import conftest_data as cd
  root = _copy(run, tmp_path)
  cut = glob.glob(os.path.join(root, '4', 'state', 'd', '*'))
  assert cut
  for path in cut:
    with open(path, 'r+b') as f:
      f.truncate(10)
  tok = tmp_path / 'tok.model'
  tok.write_bytes(cd.spm_proto())
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd())
  proc = subprocess.run([sys.executable, '-m', 'radfm_jax.cli', 'generate', '--checkpoint', root,
                         '--tokenizer', str(tok), '--prompt', 'x'],
                        capture_output=True, text=True, env=env, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[:3000]
  assert lines[0].startswith(f'radfm-jax generate: checkpoint step 4: {root}/4: does not '
                             'restore ('), lines[0]
