"""Two CPU processes x 4 devices over 127.0.0.1 train like one process with 8 devices.

The test starts this file twice as a worker (`python tests/test_multihost.py worker ...`); each
worker calls `radfm_jax.launch.initialize` with an explicit coordinator address, reads its own
rows of every global batch (SyntheticBatches by process index, assembled with
`jax.make_array_from_process_local_data`), trains 3 steps and writes its losses. The parent runs
the same 3 steps in-process on 8 fake devices with the same global batches, compares losses,
and restores the checkpoint the two processes wrote.
"""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = 'configs/radfm.py:model=tiny,mesh=cpu'
OVERRIDES = ['data.store=synthetic', 'train.synthetic_length=48', 'train.steps=3',
             'train.warmup_steps=1', 'train.learning_rate=1e-3', 'train.checkpoint_every=0', 'train.tensorboard=False']
GLOBAL_BATCH = 8


def _worker(coordinator: str, num_processes: int, process_id: int, workdir: str, out: str):
  sys.path.insert(0, ROOT)
  from radfm_jax import launch
  info = launch.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                           initialization_timeout=120)
  import jax

  from radfm_jax.config import load_config
  from radfm_jax.train import loop
  assert jax.process_count() == num_processes and len(jax.local_devices()) == 4, info
  per_host = GLOBAL_BATCH // num_processes
  cfg = load_config(SPEC, OVERRIDES + [f'data.batch_size_2d={per_host}'])
  data = loop.make_data(cfg)
  assert data.process_index == process_id and data.per_host == per_host
  result = loop.train(cfg, workdir, data=data, progress=False)
  with open(out, 'w') as f:
    json.dump({'losses': result.losses, 'step': result.step, 'info': info,
               'devices': jax.device_count()}, f)
  jax.distributed.shutdown()


def _stop_worker(coordinator: str, process_id: int, out: str):
  """Two steps of the training loop's stop agreement: nobody stops, then process 1 alone fails
  (its data: more unreadable samples than data.max_unreadable_share)."""
  sys.path.insert(0, ROOT)
  from radfm_jax import launch
  launch.initialize(coordinator, num_processes=2, process_id=process_id,
                    initialization_timeout=120)
  import jax

  from radfm_jax.train.loop import _StopFlag
  stop = _StopFlag()
  seen = [(stop.is_set(), stop.code)]
  if process_id == 1:
    stop.fail('too many unreadable samples here')
  seen.append((stop.is_set(), stop.code))
  with open(out, 'w') as f:
    json.dump({'seen': seen, 'failure': stop.failure}, f)
  jax.distributed.shutdown()


if __name__ == '__main__' and len(sys.argv) > 1 and sys.argv[1] == 'worker':
  _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
  sys.exit(0)
if __name__ == '__main__' and len(sys.argv) > 1 and sys.argv[1] == 'stop_worker':
  _stop_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
  sys.exit(0)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import conftest_data as cd  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_launch_detects_single_process(monkeypatch):
  from radfm_jax import launch
  for key in ('RADFM_COORDINATOR', 'SLURM_JOB_ID', 'MEGASCALE_COORDINATOR_ADDRESS',
              'RADFM_DISTRIBUTED', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(key, raising=False)
  if not (os.path.exists('/dev/accel0') or os.path.exists('/dev/vfio/0')):
    assert launch.detect() == 'single'
    assert launch.initialize()['process_count'] == 1
  monkeypatch.setenv('RADFM_COORDINATOR', '10.0.0.1:1234')
  assert launch.detect() == 'explicit-env'
  monkeypatch.delenv('RADFM_COORDINATOR')
  for key, value in (('SLURM_JOB_ID', '7'), ('SLURM_NTASKS', '4'), ('SLURM_PROCID', '1'),
                     ('SLURM_STEP_ID', '0')):
    monkeypatch.setenv(key, value)
  assert launch.detect() == 'slurm'


def _run_workers(tmp_path, mode: str, *extra: str) -> list[dict]:
  """Runs this file as 2 `mode` workers over 127.0.0.1 (each given the coordinator, its process
  id, `extra` and an output path) and returns their outputs."""
  coordinator = f'127.0.0.1:{_free_port()}'
  env = dict(os.environ, XLA_FLAGS=cd.xla_flags(4), JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  procs, outs = [], []
  try:
    for pid in range(2):
      outs.append(str(tmp_path / f'out{pid}.json'))
      count = ['2'] if mode == 'worker' else []
      procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), mode, coordinator, *count, str(pid),
           *extra, outs[-1]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True))
    logs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, (_, err) in zip(procs, logs):
    assert p.returncode == 0, err[-4000:]
  return [json.load(open(o)) for o in outs]


def test_one_host_failing_its_data_stops_every_host(tmp_path):
  """The training loop's stop check agrees over the hosts: a host whose data fails (its own
  pipeline's unreadable samples) stops every host at the same step, each knowing why (the loop
  then saves and raises UnreadableDataError on each), instead of leaving the others waiting in
  the next step's collectives."""
  from radfm_jax.train.loop import _StopFlag
  results = _run_workers(tmp_path, 'stop_worker')
  for r in results:
    assert r['seen'] == [[False, 0], [True, _StopFlag.FAILED]], r
  assert [r['failure'] for r in results] == [None, 'too many unreadable samples here']


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  from radfm_jax.config import load_config
  from radfm_jax.train import loop
  from radfm_jax.checkpoint import Checkpointer

  workdir = str(tmp_path / 'multi')
  results = _run_workers(tmp_path, 'worker', workdir)
  assert all(r['devices'] == 8 and r['step'] == 3 for r in results)
  multi = {int(k): v for k, v in results[0]['losses'].items()}
  assert multi == {int(k): v for k, v in results[1]['losses'].items()}

  # One process, 8 devices, the same global batches.
  cfg = load_config(SPEC, OVERRIDES + [f'data.batch_size_2d={GLOBAL_BATCH}'])
  single = loop.train(cfg, str(tmp_path / 'single'), progress=False)
  assert sorted(single.losses) == sorted(multi) == [1, 2, 3]
  for s in (1, 2, 3):
    np.testing.assert_allclose(multi[s], single.losses[s], rtol=1e-5)

  # The checkpoint the two processes wrote restores here (8 local devices) to the same state.
  _, _, _, _, abs_state, _ = loop.build(cfg)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.latest_step() == 3
  state, _ = ckpt.restore(3, abs_state)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(single.state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('env, message', [
    ({'RADFM_NUM_PROCESSES': 'two', 'RADFM_PROCESS_ID': '0'},
     "environment variable RADFM_NUM_PROCESSES='two': expected a whole number >= 1"),
    ({'RADFM_NUM_PROCESSES': '0', 'RADFM_PROCESS_ID': '0'},
     "environment variable RADFM_NUM_PROCESSES='0': expected a whole number >= 1"),
    ({'RADFM_NUM_PROCESSES': '2'},
     'environment variable RADFM_COORDINATOR is set: also set RADFM_NUM_PROCESSES and '
     'RADFM_PROCESS_ID'),
    ({'RADFM_NUM_PROCESSES': '2', 'RADFM_PROCESS_ID': '2'},
     'environment variable RADFM_PROCESS_ID=2: expected one of 0..1 (RADFM_NUM_PROCESSES=2)'),
    ({'RADFM_NUM_PROCESSES': '2', 'RADFM_PROCESS_ID': '0', 'RADFM_LOCAL_DEVICE_IDS': '0,,1'},
     "environment variable RADFM_LOCAL_DEVICE_IDS='0,,1': expected distinct device ids "
     'separated by commas, e.g. 0,1,2,3'),
    ({'RADFM_COORDINATOR': '10.0.0.1', 'RADFM_NUM_PROCESSES': '1', 'RADFM_PROCESS_ID': '0'},
     "environment variable RADFM_COORDINATOR='10.0.0.1': expected host:port, e.g. "
     '10.0.0.1:1234'),
])
def test_launch_bad_environment_is_one_line(monkeypatch, env, message):
  """A malformed cluster variable is a UserError naming it (exit 2, one line), before JAX's
  distributed runtime starts: it was int()'s ValueError, or JAX's bare IndexError for a
  coordinator without a port, with a traceback."""
  from radfm_jax import launch
  from radfm_jax.errors import UserError
  monkeypatch.setenv('RADFM_COORDINATOR', '127.0.0.1:1234')
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  with pytest.raises(UserError) as info:
    launch.initialize()
  assert str(info.value) == message


def test_launch_malformed_slurm_ntasks(monkeypatch):
  from radfm_jax import launch
  from radfm_jax.errors import UserError
  monkeypatch.delenv('RADFM_COORDINATOR', raising=False)
  for key, value in (('SLURM_JOB_ID', '7'), ('SLURM_NTASKS', 'x'), ('SLURM_PROCID', '0')):
    monkeypatch.setenv(key, value)
  with pytest.raises(UserError, match=r"^environment variable SLURM_NTASKS='x': expected a whole "
                     r'number >= 1$'):
    launch.detect()


@pytest.mark.parametrize('step, shown', [(None, 'no SLURM_STEP_ID'),
                                         ('4294967291', "SLURM_STEP_ID='4294967291'")])
def test_slurm_batch_script_with_several_tasks_is_one_line(tmp_path, step, shown):
  """`radfm-jax train` run in an sbatch script itself (not under `srun`) sees SLURM_NTASKS=2 and
  SLURM_PROCID=0 like task 0 of a step, and waited for a peer that never starts. The batch step
  has no SLURM_STEP_ID (or, in some Slurm versions, SLURM_BATCH_SCRIPT's id): one line, exit 2."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'RADFM_', 'TPU_', 'MEGASCALE_'))}
  env.update(SLURM_JOB_ID='7', SLURM_NTASKS='2', SLURM_PROCID='0', SLURM_LOCALID='0',
             SLURM_JOB_NODELIST='node[1-2]', PYTHONPATH=ROOT)
  if step is not None:
    env['SLURM_STEP_ID'] = step
  proc = subprocess.run([sys.executable, '-m', 'radfm_jax.cli', 'train', '--config', SPEC,
                         '--workdir', str(tmp_path / 'run'), '--config.data.store=synthetic'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert (proc.returncode, proc.stdout) == (2, '')
  assert proc.stderr == (f"radfm-jax train: environment variable SLURM_NTASKS='2' with {shown}: "
                         "this is the job's batch script, not an srun task; start one process "
                         'per task with `srun radfm-jax train ...` (as launch/slurm_gpu.sbatch '
                         'does)\n')


@pytest.mark.parametrize('num_slices', ['abc', '2x', '0'])
def test_tpu_pod_launcher_refuses_a_malformed_num_slices(num_slices):
  """launch/tpu_pod.sh NUM_SLICES=2x launched nothing and exited 0 (bash's arithmetic error in
  the slice loop); 'abc' was an 'unbound variable' line. Now one line naming it, exit 2, before
  any gcloud call."""
  env = dict(os.environ, NUM_SLICES=num_slices)
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_pod.sh'), 'tpu', 'zone', '--',
                         '--config', SPEC], env=env, capture_output=True, text=True, timeout=60)
  assert (proc.returncode, proc.stdout) == (2, '')
  assert proc.stderr == (f'launch/tpu_pod.sh: NUM_SLICES={num_slices}: expected a whole number '
                         '>= 1\n')


def _stand_in(path, body: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('#!/usr/bin/env bash\n' + body + '\n')
  os.chmod(path, 0o755)


@pytest.mark.parametrize('repo_dir, flags', [('{home}/my repo', "--xla_a='x y' it's"),
                                             ('~/my repo', '')])
def test_tpu_pod_launcher_quotes_the_remote_command(tmp_path, repo_dir, flags):
  """REPO_DIR with a space, or FLAGS with a single quote, broke the command the workers' shell
  parses (FLAGS was pasted inside '...'). A stand-in gcloud records its arguments; its --command
  then runs under bash in a stand-in home, where a stand-in .venv/bin/radfm-jax records the
  directory, LIBTPU_INIT_ARGS and the argument vector it receives."""
  home = str(tmp_path / 'home')
  _stand_in(str(tmp_path / 'bin' / 'gcloud'), 'printf "%s\\0" "$@" > "$GCLOUD_ARGS"')
  _stand_in(os.path.join(home, 'my repo', '.venv', 'bin', 'radfm-jax'),
            'printf "%s\\0" "$PWD" "$LIBTPU_INIT_ARGS" "$@" > "$TRAIN_ARGS"')
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
             GCLOUD_ARGS=str(tmp_path / 'gcloud'), REPO_DIR=repo_dir.format(home=home),
             FLAGS=flags)
  env.pop('PROJECT', None)
  env.pop('NUM_SLICES', None)
  train_args = ['--config', SPEC, "--workdir=/runs/it's a run"]
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_pod.sh'), 'tpu', 'zone', '--',
                         *train_args], env=env, capture_output=True, text=True, timeout=60)
  assert (proc.returncode, proc.stdout, proc.stderr) == (0, '', '')
  with open(tmp_path / 'gcloud') as f:
    gcloud = f.read().split('\0')[:-1]
  assert gcloud[:-1] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'tpu', '--zone=zone', '--worker=all']
  assert gcloud[-1].startswith('--command=')
  remote = dict(os.environ, HOME=home, TRAIN_ARGS=str(tmp_path / 'train'))
  proc = subprocess.run(['bash', '-c', gcloud[-1][len('--command='):]], cwd=str(tmp_path),
                        env=remote, capture_output=True, text=True, timeout=60)
  assert (proc.returncode, proc.stdout, proc.stderr) == (0, '', '')
  with open(tmp_path / 'train') as f:
    received = f.read().split('\0')[:-1]
  assert received == [os.path.join(home, 'my repo'), flags, 'train', '--no-progress', *train_args]


def test_tpu_pod_launcher_usage_is_its_header_on_stderr():
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_pod.sh'), 'tpu', 'zone'],
                        capture_output=True, text=True, timeout=60)
  assert (proc.returncode, proc.stdout) == (2, '')
  lines = proc.stderr.splitlines()
  assert lines[0].startswith('Run `radfm-jax train` on every worker')
  assert lines[-1] == 'writes its checkpoint shards there.'
