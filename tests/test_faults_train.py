"""The training / checkpoint side under faults of the machine, not of the input: a kill at any
moment, a second run in one workdir, a full disk or a file-size limit, a read-only folder, SIGTERM.
Each test is a case the fault pass found broken (a traceback, a half-written output that looked
complete, a leftover the rerun refused, two runs overwriting each other) and checks the one line,
the exit code and what is left on disk.

A full disk is a file-size limit here (RLIMIT_FSIZE: EFBIG where a disk gives ENOSPC; the same
code path, `errors.write_fault`): portable, no mount, as root or not. In this process only around a
call that writes nothing else (Python ignores SIGXFSZ, so a write past it fails with EFBIG).
"""

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

import conftest_data as cd
from radfm_jax.cli.main import main
from radfm_jax.config import load_config
from radfm_jax.errors import WriteError, check_writable_folder
from radfm_jax.train import rundir
from radfm_jax.train.metrics import cut_torn_line, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = 'radfm:model=tiny'
# 8 devices in this process: the batch splits over them (no compile in the in-process tests).
IN_PROCESS = ['--config.data.store=synthetic', '--config.data.batch_size_2d=8',
              '--config.train.tensorboard=False']
EXPECTED = ('expected free space, a file-size limit (ulimit -f) above the file and write '
            'permission there')


@contextlib.contextmanager
def file_size_limit(limit: int):
  """RLIMIT_FSIZE lowered to `limit` bytes for the block (the soft limit only: put back after)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _err_lines(capsys) -> list[str]:
  return capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------------------------------------
# train: one run per workdir


def test_a_second_run_in_a_workdir_is_refused(tmp_path, capsys):
  """Was: both ran; the second removed the first's unfinished step folder (Orbax's 'not
  finalized'), whose save then failed with Orbax's traceback, and their metrics rows
  interleaved. Now the second fails at once, before the model is built, naming the holder."""
  workdir = tmp_path / 'run'
  ckpt_dir = str(workdir / 'checkpoints')
  argv = ['train', '--config', SPEC, '--workdir', str(workdir)] + IN_PROCESS
  with rundir.lock_workdir(ckpt_dir, str(workdir)):
    assert main(argv) == 2
    (line,) = _err_lines(capsys)
    assert line == (f'radfm-jax train: workdir {workdir}: another radfm-jax train is running in '
                    f'it (pid {os.getpid()} since ' + line.split(' since ')[1].split(';')[0]
                    + f'; lock {ckpt_dir}/.lock); expected one run per workdir: wait for that run '
                    'to end or use another --workdir')
  assert os.listdir(ckpt_dir) == []              # released: the lock file goes with the run
  # A run that fails after taking the lock (another config in the workdir) releases it too.
  os.makedirs(os.path.join(ckpt_dir, '4'))
  rundir.write_record(ckpt_dir, rundir.record(load_config(
      SPEC, [o.removeprefix('--config.') for o in IN_PROCESS] + ['model.llama.num_layers=3']),
      None))
  assert main(argv) == 2
  assert 'holds a run with model.llama.num_layers=3, you asked for 2;' in _err_lines(capsys)[-1]
  with rundir.lock_workdir(ckpt_dir, str(workdir)):
    pass
  # A lock file a killed run left (no holder) is taken over.
  with open(os.path.join(ckpt_dir, rundir.LOCK_FILE), 'w') as f:
    f.write('pid 1 since then\n')
  with rundir.lock_workdir(ckpt_dir, str(workdir)):
    with open(os.path.join(ckpt_dir, rundir.LOCK_FILE)) as f:
      assert f.read().startswith(f'pid {os.getpid()} since ')


def test_torn_line_is_cut(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  assert cut_torn_line(path) == 0                               # no file
  with open(path, 'w') as f:
    f.write('{"step": 1}\n{"step": 2}\n')
  assert cut_torn_line(path) == 0
  with open(path, 'a') as f:
    f.write('{"step": 3, "lo')
  assert cut_torn_line(path) == 15
  assert open(path).read() == '{"step": 1}\n{"step": 2}\n'
  with open(path, 'w') as f:
    f.write('{"st')                                             # a first line, torn
  assert cut_torn_line(path) == 4 and open(path).read() == ''


# ------------------------------------------------------------------------------------------------
# train: a save the disk refuses, then the rerun (two real runs: one compile, then the cache)


@pytest.mark.slow
def test_a_refused_checkpoint_save_is_one_line_and_the_rerun_resumes(tmp_path):
  """Was: Orbax's traceback (several, from its threads), exit 1. Now one line naming the step
  folder, exit 2, the step's unfinished folder never read; the rerun removes it and says so,
  cuts the torn metrics line a full disk can leave, and completes."""
  run = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=cd.xla_flags(1), PYTHONPATH=ROOT)
  argv = [sys.executable, '-m', 'radfm_jax.cli.main', 'train', '--config', SPEC, '--workdir',
          str(run), '--no-progress', '--max-steps', '2'] + [f'--config.{o}' for o in (
              'data.store=synthetic', 'data.batch_size_2d=2', 'train.synthetic_length=48',
              'train.tensorboard=False', 'train.steps=100', 'train.checkpoint_every=2',
              'train.log_every=1', 'model.llama.vocab_size=8192')]

  # Above a compiled program in the cache, below the step's largest array: OCDBT packs a step's
  # arrays into data files whose sizes depend on the writes' timing, but never splits one array's
  # chunk (the embedding, 8192 x 64 float32: 2 MiB), so some file always passes the limit.
  def limited():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(
        resource.RLIMIT_FSIZE)[1]))
  first = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=limited)
  assert first.returncode == 2, first.stderr[-3000:]
  assert 'Traceback' not in first.stderr and 'absl' not in first.stderr, first.stderr[-3000:]
  assert first.stderr.strip().splitlines()[-1] == (
      f'radfm-jax train: {run}/checkpoints/2: could not write (File too large); {EXPECTED}; no '
      'step was saved')
  assert sorted(os.listdir(run / 'checkpoints')) == ['2.orbax-checkpoint-tmp', 'config.json']
  with open(run / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 3, "split": "tr')                         # a row the full disk cut

  second = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
  assert second.returncode == 0, second.stderr[-3000:]
  assert (f'radfm-jax train: removed {run}/checkpoints/2.orbax-checkpoint-tmp: the unfinished '
          'save of step 2 (cut short by a kill or a refused write; never read)') in second.stderr
  assert (f'radfm-jax train: {run}/metrics.jsonl: cut off a torn last line (24 bytes: a write '
          'cut short by a kill or a full disk)') in second.stderr
  assert 'WARNING' not in second.stderr
  summary = json.loads(second.stdout.strip().splitlines()[-1])
  assert (summary['status'], summary['step'], summary['checkpoint']) == ('done', 2, 2)
  assert sorted(os.listdir(run / 'checkpoints')) == ['2', 'config.json']
  assert [r['step'] for r in read_metrics(str(run), 'train')] == [1, 2, 1, 2]


# ------------------------------------------------------------------------------------------------
# convert / merge: a kill, a full disk, --overwrite


@pytest.fixture(scope='module')
def official(tiny_cfg, tmp_path_factory):
  """The tiny official state dict as a .safetensors file."""
  pytest.importorskip('torch')
  from safetensors.numpy import save_file

  from convert_fixtures import official_state_dict
  sd = official_state_dict(tiny_cfg, seed=3, keep_dead=False)
  path = str(tmp_path_factory.mktemp('official') / 'model.safetensors')
  save_file({k: v.numpy() for k, v in sd.items() if k != 'embedding_layer.weight'}, path)
  return path


TINY = ['--config', 'configs/radfm.py:model=tiny']


def test_convert_after_a_kill_a_full_disk_and_an_overwrite(official, tmp_path, capsys,
                                                           monkeypatch):
  def convert(out, *flags):
    code = main(['convert', 'from-torch', '--checkpoint', official, '--out', str(out), *TINY,
                 *flags])
    return code, _err_lines(capsys)

  # Killed while writing the tree (Was: the rerun refused the folder, with --overwrite too:
  # 'a folder that is not a parameter-only checkpoint'): the temporary files are written over.
  out = tmp_path / 'ckpt'
  (out / 'params.partial' / 'llama.norm.scale').mkdir(parents=True)
  (out / 'params.partial.orbax-checkpoint-tmp').mkdir()
  (out / 'config.json.tmp').write_text('{"lay')
  assert convert(out)[0] == 0
  assert sorted(os.listdir(out)) == ['config.json', 'params']
  # Killed between the tree's rename and its config.json: replaced only with --overwrite.
  os.remove(out / 'config.json')
  assert convert(out) == (2, [
      f'radfm-jax convert: --out {out}: holds params/ but no config.json: a conversion or merge '
      'that did not finish; expected a new folder (or --overwrite to replace it)'])
  assert convert(out, '--overwrite')[0] == 0
  # --overwrite killed once the old tree is gone: the old config.json went first, so the folder
  # never pairs it with another tree (Was: the old record stayed until the new one was written).
  real_replace = os.replace

  def killed(src, dst):
    if str(src).endswith('params.partial'):
      raise KeyboardInterrupt
    return real_replace(src, dst)
  monkeypatch.setattr(os, 'replace', killed)
  assert convert(out, '--overwrite') == (130, ['radfm-jax convert: interrupted'])
  monkeypatch.undo()
  assert 'config.json' not in os.listdir(out)
  assert convert(out)[0] == 0                  # only what the write left: written over
  # A full disk (Was: TensorStore's traceback, exit 1): one line naming params/, nothing left.
  full = tmp_path / 'full'
  with file_size_limit(16 << 10):
    code, err = convert(full)
  assert (code, err) == (2, [f'radfm-jax convert: {full}/params: could not write (File too '
                             f'large); {EXPECTED}'])
  assert os.listdir(full) == []
  assert convert(full)[0] == 0


def test_export_and_merge_write_nothing_on_a_full_disk(official, tmp_path, capsys):
  """to-torch: Was: torch's 'iostream error' traceback for a .bin (its own file writer names no
  reason), Python's for .safetensors. merge (`checkpoint.save`): Was: params.partial left."""
  from radfm_jax import checkpoint
  from radfm_jax.checkpoint import params
  ckpt = tmp_path / 'ckpt'
  assert main(['convert', 'from-torch', '--checkpoint', official, '--out', str(ckpt)] + TINY) == 0
  capsys.readouterr()
  for name in ('model.bin', 'model.safetensors'):
    out = tmp_path / name
    with file_size_limit(64 << 10):
      code = main(['convert', 'to-torch', '--checkpoint', str(ckpt), '--out', str(out)])
    assert (code, _err_lines(capsys)) == (2, [
        f'radfm-jax convert: {out}: could not write (File too large); {EXPECTED}'])
    assert sorted(os.listdir(tmp_path)) == ['ckpt']             # no .partial either
  model, _ = checkpoint.load(str(ckpt))
  with file_size_limit(16 << 10), pytest.raises(WriteError, match=(
      f'^{tmp_path}/merged/params: could not write \\(File too large\\)')):
    params.save(model, str(tmp_path / 'merged'))
  assert os.listdir(tmp_path / 'merged') == []


# ------------------------------------------------------------------------------------------------
# generate / eval: SIGTERM, a full disk, a read-only folder


@pytest.fixture
def prompts(tmp_path, monkeypatch):
  """An --input file of 3 prompts over a real PNG, and generate's model and decoding replaced by
  a fake that answers 'answer <id>' (`stop_after`: sends this process SIGTERM after that many)."""
  import radfm_jax.cli.generate as generate_cli
  import radfm_jax.infer.prompt_files as prompt_files
  cd.write_png(tmp_path / 'x.png', __import__('numpy').zeros((8, 8), 'uint8'))
  path = tmp_path / 'in.jsonl'
  path.write_text(''.join(json.dumps({'id': f'q{i}', 'prompt': '<image> What?',
                                      'images': [str(tmp_path / 'x.png')]}) + '\n'
                          for i in range(3)))
  state = {'stop_after': None}

  def fake_items(model, tokenizer, data_cfg, items, *args, **kwargs):
    for n, it in enumerate(items):
      if n == state['stop_after']:
        os.kill(os.getpid(), signal.SIGTERM)
      yield it, f'answer {it["id"]}', [1, 2]
  monkeypatch.setattr(generate_cli, 'load', lambda args: (None, None, None, None))
  monkeypatch.setattr(prompt_files, 'generate_items', fake_items)
  return str(path), state


def test_generate_output_is_complete_or_partial(prompts, tmp_path, capsys):
  """Was: --output written in place, so SIGINT left a file of 2 of 3 answers that looked
  complete, and SIGTERM killed the command silently mid-write (exit -15)."""
  path, state = prompts
  out = tmp_path / 'answers.jsonl'
  argv = ['generate', '--checkpoint', str(tmp_path), '--input', path, '--output', str(out),
          '--no-progress']
  state['stop_after'] = 2
  before = signal.getsignal(signal.SIGTERM)
  assert main(argv) == 130
  assert _err_lines(capsys) == [f'radfm-jax generate: interrupted (SIGTERM; 2 of 3 answers kept '
                                f'in {out}.partial; {out} not written)']
  assert signal.getsignal(signal.SIGTERM) is before             # put back
  assert not out.exists()
  assert [json.loads(x)['id'] for x in open(f'{out}.partial')] == ['q0', 'q1']
  state['stop_after'] = None
  assert main(argv) == 0
  assert [json.loads(x)['prediction'] for x in open(out)] == [f'answer q{i}' for i in range(3)]
  assert not os.path.exists(f'{out}.partial')
  # A full disk: one line naming the file (Was: OSError's traceback, no file named).
  with file_size_limit(100):
    assert main(argv[:-3] + ['--output', str(tmp_path / 'big.jsonl'), '--no-progress']) == 2
  assert _err_lines(capsys) == [f'radfm-jax generate: {tmp_path}/big.jsonl.partial: could not '
                                f'write (File too large); {EXPECTED}']
  assert not (tmp_path / 'big.jsonl').exists()


def test_an_unwritable_output_folder_fails_before_the_work(prompts, tmp_path, capsys,
                                                           monkeypatch):
  """A read-only folder (as root only a read-only mount stops a write; here os.access says no).
  Was: generate and eval failed only once every answer was generated, with a traceback."""
  import radfm_jax.cli.eval as eval_cli
  import radfm_jax.cli.generate as generate_cli
  path, _ = prompts
  locked = tmp_path / 'locked'
  locked.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: False if str(p) == str(locked) else
                      real_access(p, mode))

  def no_work(args):
    raise AssertionError('the model was loaded')
  monkeypatch.setattr(generate_cli, 'load', no_work)
  monkeypatch.setattr(eval_cli, 'load', no_work)
  assert main(['generate', '--checkpoint', str(tmp_path), '--input', path, '--output',
               str(locked / 'a.jsonl')]) == 2
  assert _err_lines(capsys) == [f'radfm-jax generate: --output {locked}/a.jsonl: {locked}: could '
                                'not write (Permission denied); expected a folder this user can '
                                'write']
  assert main(['eval', '--checkpoint', str(tmp_path), '--data', path, '--out',
               str(locked / 'ev'), '--entities', 'none']) == 2
  assert _err_lines(capsys) == [f'radfm-jax eval: --out {locked}/ev: {locked}: could not write '
                                '(Permission denied); expected a folder this user can write']
  with pytest.raises(WriteError):
    check_writable_folder(str(locked / 'new' / 'deeper'), '--out')
  # A write refused where no command wrapped it (here: eval's --out made on a read-only disk)
  # is one line naming the path, not a traceback.
  monkeypatch.setattr(eval_cli, '_run', lambda args: (_ for _ in ()).throw(
      OSError(errno.EROFS, os.strerror(errno.EROFS), str(locked / 'ev'))))
  assert main(['eval', '--predictions', path, '--out', str(locked / 'ev')]) == 2
  assert _err_lines(capsys) == [f'radfm-jax eval: {locked}/ev: could not write (Read-only file '
                                f'system); {EXPECTED}']


def test_eval_sigterm_and_its_outputs(prompts, tmp_path, capsys, monkeypatch):
  """SIGTERM: Was: killed silently (exit -15); now one line, 130, nothing written. The outputs:
  Was: predictions.jsonl and summary.json written in place, one after the other, so a full disk
  left a cut file beside the previous run's summary; now both whole, or the previous ones."""
  import radfm_jax.cli.eval as eval_cli
  from radfm_jax.eval import harness
  path, _ = prompts
  out = tmp_path / 'ev'

  def terminated(args):
    os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(eval_cli, 'load', terminated)
  monkeypatch.setattr(harness, 'load_samples', lambda data, limit, split: ['a sample'])
  assert main(['eval', '--checkpoint', str(tmp_path), '--data', path, '--split', 'all', '--out',
               str(out), '--entities', 'none']) == 130
  assert _err_lines(capsys) == ['radfm-jax eval: interrupted (SIGTERM)']
  assert not out.exists()
  harness._write_outputs(str(out), {'predictions.jsonl': 'old\n', 'summary.json': '{"old": 1}'})
  with file_size_limit(1000), pytest.raises(WriteError, match=(
      f'^{out}/predictions.jsonl: could not write \\(File too large\\)')):
    harness._write_outputs(str(out), {'predictions.jsonl': 'x' * 5000 + '\n',
                                      'summary.json': '{"new": 1}'})
  assert sorted(os.listdir(out)) == ['predictions.jsonl', 'summary.json']
  assert (out / 'predictions.jsonl').read_text() == 'old\n'
  assert (out / 'summary.json').read_text() == '{"old": 1}'


# ------------------------------------------------------------------------------------------------
# train: a kill while an old step (past train.keep_checkpoints) is being removed


def test_old_steps_leave_through_a_rename_and_a_half_removed_one_is_finished(tmp_path, capsys,
                                                                            monkeypatch):
  """Was: Orbax removed a step past `max_to_keep` in place, so a kill during that removal left a
  half-deleted `<step>/` that still listed as a step. Now the step is renamed into
  `.deleting/` first (never listed), then removed; what a kill leaves there goes at the next
  start, said in one line."""
  import jax.numpy as jnp
  import numpy as np

  from radfm_jax.checkpoint import Checkpointer, train_state
  ckpt_dir = str(tmp_path / 'run' / 'checkpoints')
  state = {'w': jnp.arange(6.0), 'b': jnp.ones((2, 3))}
  # the removal cut short: the rename happens, the purge does not
  monkeypatch.setattr(train_state, 'purge_deleted', lambda directory, idle=True: [])
  ckpt = Checkpointer(ckpt_dir, max_to_keep=1)
  for step in (1, 2, 3):
    ckpt.save(step, {k: v + step for k, v in state.items()})
  ckpt.close()
  assert ckpt.all_steps() == [3]
  assert sorted(os.listdir(ckpt_dir)) == ['.deleting', '3', 'config.json']
  deleting = os.path.join(ckpt_dir, '.deleting')
  assert sorted(os.listdir(deleting)) == ['1', '2']
  restored = Checkpointer(ckpt_dir).restore(3, state)[0]
  np.testing.assert_array_equal(restored['w'], np.arange(6.0) + 3)
  # a kill in the middle of the removal: part of step 1's files gone
  victims = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(deleting, '1'))
                   for f in files)
  for path in victims[:len(victims) // 2]:
    os.remove(path)
  monkeypatch.undo()
  # The next run removes both first thing (its config differs: it stops right after, building
  # nothing)
  workdir = tmp_path / 'run'
  rundir.write_record(ckpt_dir, rundir.record(load_config(
      SPEC, [o.removeprefix('--config.') for o in IN_PROCESS] + ['model.llama.num_layers=3']),
      None))
  assert main(['train', '--config', SPEC, '--workdir', str(workdir)] + IN_PROCESS) == 2
  lines = _err_lines(capsys)
  assert lines[:2] == [f'radfm-jax train: removed {deleting}/{n}: an old step past '
                       'train.keep_checkpoints whose removal a kill cut short (never read)'
                       for n in (1, 2)], lines
  assert not os.path.exists(deleting) and Checkpointer(ckpt_dir).all_steps() == [3]
  # Within a run the removal completes at the next save, wait or close
  ckpt = Checkpointer(ckpt_dir, max_to_keep=1)
  ckpt.save(4, state)
  ckpt.wait()
  assert ckpt.all_steps() == [4] and os.listdir(deleting) == []
  ckpt.close()
  assert sorted(os.listdir(ckpt_dir)) == ['4', 'config.json']
