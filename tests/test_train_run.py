"""What a user meets running `radfm-jax train`: synthetic data only by name, warmup that fits short
runs, a workdir holding another run, the start-up / compile / resume lines, the persistent
compilation cache, loss_curve.png, Ctrl-C, and a run directory that works from anywhere.

The CLI runs are real subprocesses on one CPU device (compiles are the cost here); they share one
compilation cache folder, as a user's runs share ~/.cache/radfm-jax/jax.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import optax
import pytest

from radfm_jax import hostmem
from radfm_jax.errors import InputError

import conftest_data as cd
from radfm_jax.checkpoint import Checkpointer
from radfm_jax.config import ConfigError, load_config
from radfm_jax.train import loop, optim, rundir
from radfm_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One worker: the CLI runs share one compilation cache folder (`xdg`) and find it warm.
pytestmark = pytest.mark.xdist_group('train_run')

SPEC = 'radfm:model=tiny'
SMALL = ['data.batch_size_2d=2', 'train.synthetic_length=48', 'train.log_every=1',
         'train.tensorboard=False']
# The same for a run on a store (train.synthetic_length is read by synthetic batches only).
STORE_SMALL = [o for o in SMALL if not o.startswith('train.synthetic')]
# The synthetic run of the CLI tests: one config (train.steps is in the compiled schedule), bounded
# by --max-steps, so every run after the first loads its train step from the cache.
RUN = ['data.store=synthetic', 'train.steps=100000', 'train.checkpoint_every=2']
NO_STORE = ('radfm-jax train: config field data.store is empty: expected the VolumeStore folder '
            'written by `radfm-jax ingest` (--config.data.store=STORE), or '
            '--config.data.store=synthetic to train on random batches')


def _cli(args, cwd=ROOT, env=None, **kwargs):
  return subprocess.run([sys.executable, '-m', 'radfm_jax.cli.main'] + args, cwd=cwd, env=env,
                        capture_output=True, text=True, **kwargs)


def _env(xdg):
  """One CPU device, ROOT importable from any cwd, the default cache location under `xdg`."""
  env = {k: v for k, v in os.environ.items() if k != 'RADFM_COMPILATION_CACHE'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=cd.xla_flags(1),
             XDG_CACHE_HOME=str(xdg), PYTHONPATH=ROOT)
  return env


def _flags(*overrides):
  store = any(o.startswith('data.store=') and o != 'data.store=synthetic' for o in overrides)
  return [f'--config.{o}' for o in (STORE_SMALL if store else SMALL) + list(overrides)]


def _summary(proc) -> dict:
  assert proc.returncode in (0, 130), proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def xdg(tmp_path_factory):
  return tmp_path_factory.mktemp('xdg')


# ------------------------------------------------------------------------------------------------
# Fast: no compile


def test_synthetic_data_only_when_named(tmp_path, capsys):
  from radfm_jax.cli.main import main
  from radfm_jax.train.synthetic import SyntheticBatches
  cfg = load_config(SPEC, SMALL)
  with pytest.raises(ConfigError) as e:
    loop.make_data(cfg)
  assert f'radfm-jax train: {e.value}' == NO_STORE
  code = main(['train', '--config', SPEC, '--workdir', str(tmp_path / 'run')] + _flags())
  assert code == 2
  assert capsys.readouterr().err.strip().splitlines() == [NO_STORE]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')     # failed before any output
  # open_data checks the batch against the mesh: batch 2 splits over 1 device, not this test's 8.
  data, text = loop.open_data(load_config(SPEC, SMALL + ['data.store=synthetic']), num_devices=1)
  assert isinstance(data, SyntheticBatches) and data.get_state() == {'index': 0}
  assert text.endswith('one bucket images 2x1x3x64x64x4, text 48')
  # A mixture with random batches would be accepted and do nothing (before: a run that ignored it).
  with pytest.raises(ConfigError, match=r"^config field data.mixture=\{'nope': 1.0\}: expected "
                     r'none with data.store=synthetic \(random batches, no datasets to weigh\); '
                     r'the weights apply to a VolumeStore$'):
    loop.make_data(load_config(SPEC, SMALL + ['data.store=synthetic',
                                              "data.mixture={'nope': 1.0}"]))
  # A real store without a tokenizer names the field, not `FileNotFoundError: ''`.
  with pytest.raises(InputError, match=r'^config field data.tokenizer is empty; expected a '
                     r'SentencePiece tokenizer.model: train one with `radfm-jax tokenizer train'):
    loop.make_data(load_config(SPEC, [f'data.store={tmp_path}']))


def test_warmup_fits_short_runs_and_keeps_the_radfm_schedule():
  default = load_config(SPEC)                   # the radfm experiment as shipped
  assert (default.train.steps, default.train.warmup_steps, default.train.warmup) == (1000, -1, 100)
  lr = default.train.learning_rate
  ours = optim.make_schedule(default.train)
  theirs = optax.warmup_cosine_decay_schedule(0.0, lr, 100, 1000, lr * 0.1)
  for s in (0, 1, 50, 99, 100, 101, 500, 999, 1000):
    assert float(ours(s)) == float(theirs(s)), s
  # Short runs work with the defaults: a tenth of the run warms up (20 steps -> 2, 9 -> 0).
  for steps, warmup in ((20, 2), (9, 0), (1, 0), (5000, 100)):
    t = load_config(SPEC, [f'train.steps={steps}']).train
    assert t.warmup == warmup, steps
    schedule = optim.make_schedule(t)
    assert float(schedule(warmup)) == pytest.approx(lr, rel=1e-6)
  assert float(optim.make_schedule(load_config(SPEC, ['train.steps=20']).train)(1)) == (
      pytest.approx(lr / 2, rel=1e-6))
  # An explicit warmup is used as given, and must fit.
  assert load_config(SPEC, ['train.steps=20', 'train.warmup_steps=7']).train.warmup == 7
  with pytest.raises(ConfigError, match=re.escape(
      "config field train.warmup_steps=20: expected 0 <= warmup_steps < train.steps=20, or -1 "
      "(automatic: min(100, steps // 10))")):
    load_config(SPEC, ['train.steps=20', 'train.warmup_steps=20'])


def _fake_run(workdir, cfg):
  """A workdir whose checkpoints/config.json holds `cfg` and whose step folder 4 is empty: Orbax
  could not restore it, so a check that passes would fail later with another error."""
  folder = workdir / 'checkpoints'
  (folder / '4').mkdir(parents=True)
  rundir.write_record(str(folder), rundir.record(cfg, None))


def test_workdir_holding_another_config_fails_naming_the_fields(tmp_path, capsys):
  from radfm_jax.cli.main import main
  base = SMALL + ['data.store=synthetic', 'data.batch_size_2d=8']   # 8 devices in this process
  _fake_run(tmp_path / 'a', load_config(SPEC, base))
  code = main(['train', '--config', SPEC, '--workdir', str(tmp_path / 'a')] + _flags(
      'data.store=synthetic', 'data.batch_size_2d=8', 'model.llama.hidden_size=128',
      'train.learning_rate=0.001'))
  assert code == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(
      f'radfm-jax train: workdir {tmp_path / "a"} holds a run with model.llama.hidden_size=64, '
      'you asked for 128; train.learning_rate=0.0001, you asked for 0.001; use another '
      '--workdir or the same config (may change on resume: train.steps, ')
  assert line.endswith('data.num_workers, data.image_cache, mesh.*, generate.*, '
                       'model.dense_backward)')
  # What may change on resume passes the check (and then reaches the empty step: Orbax's error).
  resumed = load_config(SPEC, base + ['train.steps=50', 'train.log_every=5', 'mesh.rules=fsdp_tp',
                                      'generate.max_new_tokens=3',
                                      "model.dense_backward='autodiff'"])
  rundir.check_same_run(rundir.record(resumed, None), str(tmp_path / 'a' / 'checkpoints'), 'a')
  assert rundir.config_differences({'model': {'size': 'tiny', 'old_field': 1}},
                                   {'model': {'size': 'tiny', 'new_field': 2}}) == []
  # A folder with a config.json but no finished step (a run that died compiling) is reusable.
  (tmp_path / 'a' / 'checkpoints' / '4').rmdir()
  rundir.check_same_run({'model': {'size': 'other'}}, str(tmp_path / 'a' / 'checkpoints'), 'a')


def test_a_resume_says_each_field_it_changes(tmp_path, capsys):
  """A resume may change the RESUMABLE fields (the generate section, the length, the cadence)
  and writes them into the run's record; each change is said, never taken in silence. (No step
  runs: max_steps=0 saves step 0 and compiles nothing.)"""
  base = SMALL + ['data.store=synthetic', 'data.batch_size_2d=8', 'train.steps=4']
  loop.train(load_config(SPEC, base), str(tmp_path / 'run'), max_steps=0, progress=False)
  capsys.readouterr()
  loop.train(load_config(SPEC, base + ['generate.stop_ids=[1]', 'train.steps=6']),
             str(tmp_path / 'run'), max_steps=0, progress=False)
  lines = [x for x in capsys.readouterr().err.splitlines() if 'resume changes' in x]
  assert lines == ['radfm-jax train: resume changes generate.stop_ids: [2, 1] -> [1]',
                   'radfm-jax train: resume changes train.steps: 4 -> 6']
  record = json.loads((tmp_path / 'run' / 'checkpoints' / 'config.json').read_text())
  assert record['generate']['stop_ids'] == [1] and record['train']['steps'] == 6
  # finetune.init_from is said not to be read on resume
  loop.train(load_config(SPEC, base + ['generate.stop_ids=[1]', 'train.steps=6',
                                       'finetune.init_from=/nowhere/ckpt']),
             str(tmp_path / 'run'), max_steps=0, progress=False)
  lines = [x for x in capsys.readouterr().err.splitlines() if 'init_from' in x]
  assert lines == [
      "radfm-jax train: resume changes finetune.init_from: '' -> '/nowhere/ckpt' (recorded, not "
      'read: a resume starts from its own steps, only a fresh run from finetune.init_from)']
  # a max_steps past train.steps is said, not capped in silence
  t = load_config(SPEC, base).train
  assert loop.last_step(t, None) == (4, None) and loop.last_step(t, 3) == (3, None)
  assert loop.last_step(t, 4) == (4, None)
  assert loop.last_step(t, 9) == (4, 'max steps 9 (--max-steps): past train.steps=4, where the '
                                     'learning-rate schedule ends; the run stops at step 4 '
                                     '(raise train.steps to train longer)')


def test_tokenizer_is_kept_in_the_workdir(tmp_path):
  tok = tmp_path / 'tok.model'
  tok.write_bytes(cd.spm_proto())
  cfg = load_config(SPEC, [f'data.store={tmp_path / "store"}', f'data.tokenizer={tok}'])
  copy = rundir.keep_tokenizer(cfg, str(tmp_path / 'run'))
  assert copy == str(tmp_path / 'run' / 'tokenizer.model')
  assert open(copy, 'rb').read() == tok.read_bytes()
  assert rundir.keep_tokenizer(cfg, str(tmp_path / 'run')) == copy     # same bytes: reused
  other = tmp_path / 'other.model'
  other.write_bytes(cd.spm_proto(vocab_size=300))
  with pytest.raises(ConfigError, match=re.escape(
      f"config field data.tokenizer='{other}': differs from the tokenizer this run trained with "
      f"({copy}); use another --workdir or that tokenizer")):
    rundir.keep_tokenizer(load_config(SPEC, [f'data.tokenizer={other}']), str(tmp_path / 'run'))
  record = rundir.record(load_config(SPEC, ['data.store=store', 'data.manifest=m.jsonl']), copy)
  assert record['data'] == {**record['data'], 'store': os.path.abspath('store'),
                            'manifest': os.path.abspath('m.jsonl'), 'tokenizer': copy}
  assert rundir.record(load_config(SPEC, ['data.store=synthetic']), None)['data']['store'] == (
      'synthetic')


# ------------------------------------------------------------------------------------------------
# CLI runs (subprocesses)


@pytest.mark.slow
def test_rerun_and_resume_compile_nothing_twice(tmp_path, xdg):
  env = _env(xdg)
  cache = xdg / 'radfm-jax' / 'jax'
  run = tmp_path / 'run'
  args = ['train', '--config', SPEC, '--workdir', str(run), '--no-progress'] + _flags(*RUN)
  first = _cli(args + ['--max-steps', '2'], env=env)
  got = _summary(first)
  assert (got['status'], got['step'], got['checkpoint']) == ('done', 2, 2)
  assert got['compilation_cache']['misses'] > 0 and got['compilation_cache']['hits'] == 0
  entries = sorted(os.listdir(cache))
  assert len(entries) == got['compilation_cache']['misses']
  lines = [line for line in first.stderr.splitlines() if line.startswith('radfm-jax train: ')]
  assert re.fullmatch(r'radfm-jax train: model tiny: \d+\.\d\dM parameters \(\d+\.\d\dM '
                      r'trainable\), float32 parameters, float32 compute', lines[0]), lines
  assert lines[1].startswith('radfm-jax train: 1 cpu device(s) ') and lines[1].endswith(
      'over 1 process(es); mesh data=1 fsdp=1 tensor=1, rules fsdp')
  # The `cpu` preset's host allocator: the command restarted itself with its settings.
  assert lines[2] == 'radfm-jax train: ' + hostmem.describe('hugepages', {
      'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'})
  assert lines[3] == ('radfm-jax train: data: synthetic (data.store=synthetic): random batches, '
                      'one bucket images 2x1x3x64x64x4, text 48')
  assert lines[4] == (f'radfm-jax train: workdir {run}: checkpoints/, metrics.jsonl, '
                      f'loss_curve.png; compilation cache: {cache}')
  assert lines[5] == ('radfm-jax train: steps 0 -> 2 of train.steps=100000 (warmup 100, '
                      'learning rate 0.0001), a checkpoint every 2 steps')
  assert lines[6] == ('radfm-jax train: compiling train step for bucket images 2x1x3x64x64x4, '
                      'text 48 ...')
  assert re.fullmatch(r'radfm-jax train: train step for bucket images 2x1x3x64x64x4, text 48 '
                      r'compiled in \d+\.\d s', lines[7]), lines
  assert lines[8] == f'radfm-jax train: loss curve: {run / "loss_curve.png"}'
  # The resume: its own line, no Orbax warnings, nothing compiled, nothing added to the cache.
  second = _cli(args + ['--max-steps', '4'], env=env)
  got = _summary(second)
  assert (got['status'], got['step'], got['checkpoint']) == ('done', 4, 4)
  assert got['compilation_cache']['misses'] == 0 and got['compilation_cache']['hits'] > 0
  assert sorted(os.listdir(cache)) == entries
  assert 'radfm-jax train: resumed from step 2 (data position restored)' in second.stderr
  assert 'loaded from the compilation cache in' in second.stderr
  assert 'WARNING' not in second.stderr and 'absl' not in second.stderr, second.stderr
  assert [r['step'] for r in read_metrics(str(run), 'train')] == [1, 2, 3, 4]
  # One config record, with the layout; loss_curve.png over steps 1-4 (a 700 x 400 PNG).
  assert sorted(os.listdir(run)) == ['checkpoints', 'loss_curve.png', 'metrics.jsonl']
  with open(run / 'checkpoints' / 'config.json') as f:
    record = json.load(f)
  assert (record['layout'], record['data']['store'], record['train']['steps']) == (
      'train_state', 'synthetic', 100000)
  from PIL import Image
  with Image.open(run / 'loss_curve.png') as image:
    assert (image.format, image.size) == ('PNG', (700, 400))
  # A second identical run in a fresh workdir compiles nothing either.
  third = _cli(['train', '--config', SPEC, '--workdir', str(tmp_path / 'again'), '--no-progress',
                '--max-steps', '1'] + _flags(*RUN), env=env)
  got = _summary(third)
  assert got['step'] == 1 and got['compilation_cache']['misses'] == 0
  assert sorted(os.listdir(cache)) == entries
  # Another config on the same workdir: one line, before Orbax, exit 2.
  other = _cli(args + ['--config.model.llama.num_layers=3'], env=env)
  assert other.returncode == 2
  assert other.stderr.strip().startswith(
      f'radfm-jax train: workdir {run} holds a run with model.llama.num_layers=2, you asked '
      'for 3; use another --workdir or the same config')
  assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize('sig, code, status', [(signal.SIGINT, 130, 'interrupted'),
                                               (signal.SIGTERM, 0, 'preempted')],
                         ids=['SIGINT', 'SIGTERM'])
def test_a_signal_saves_a_checkpoint_at_the_current_step(tmp_path, xdg, sig, code, status):
  """Ctrl-C: checkpoint, status 'interrupted', exit 130; SIGTERM (preemption): checkpoint, status
  'preempted', exit 0 (a scheduler's requeue is not an error)."""
  run = tmp_path / 'run'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'radfm_jax.cli.main', 'train', '--config', SPEC, '--workdir',
       str(run), '--no-progress'] + _flags(*RUN),
      cwd=ROOT, env=_env(xdg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
      if len(read_metrics(str(run), 'train')) >= 3:
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=200)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == code, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary['status'] == status and summary['step'] >= 3
  assert summary['checkpoint'] == summary['step']
  assert (f'radfm-jax train: signal {sig.name} received; checkpoint saved at step '
          f'{summary["step"]} in {run / "checkpoints"}') in err
  ckpt = Checkpointer(str(run / 'checkpoints'))
  assert ckpt.latest_step() == summary['step']
  ckpt.close()


@pytest.mark.slow
def test_run_directory_works_from_any_directory(tmp_path, xdg):
  a, b = tmp_path / 'a', tmp_path / 'b'
  a.mkdir()
  b.mkdir()
  cd.png_store(a, 2)
  env = _env(xdg)
  trained = _cli(['train', '--config', SPEC, '--workdir', 'run', '--no-progress'] + _flags(
      'data.store=store', 'data.tokenizer=tok.model', 'data.text_lengths=[128]',
      'train.steps=1'), cwd=a, env=env)
  got = _summary(trained)
  assert (got['status'], got['step']) == ('done', 1)
  run = a / 'run'
  assert (f'radfm-jax train: data: {a / "store" / "manifest.jsonl"}: samples train 2; the train '
          'split in 1 shape bucket(s): 2d 64x64x4 x 1 image(s), text 128: 2 samples; mixture '
          'proportional to size (data.mixture empty): default 2 (100.0%)\n'
          f'radfm-jax train: tokenizer: tok.model (kept in the run as {run / "tokenizer.model"})'
          '\n') in trained.stderr
  assert (run / 'tokenizer.model').read_bytes() == (a / 'tok.model').read_bytes()
  with open(run / 'checkpoints' / 'config.json') as f:
    data = json.load(f)['data']
  assert (data['store'], data['tokenizer']) == (str(a / 'store'), str(run / 'tokenizer.model'))
  ask = ['generate', '--checkpoint', '../a/run', '--image', '../a/x0.png', '--prompt',
         '<image> What is in the image?', '--config.generate.max_new_tokens=2']
  answer = _cli(ask, cwd=b, env=env)
  assert answer.returncode == 0, answer.stderr[-3000:]
  assert len(answer.stdout.strip().splitlines()) == 1
  # With the tokenizer gone (the copy and the original), the message names the flag.
  os.remove(run / 'tokenizer.model')
  os.remove(a / 'tok.model')
  lost = _cli(ask, cwd=b, env=env)
  assert lost.returncode == 2
  assert lost.stderr.strip() == (
      'radfm-jax generate: ../a/run: no tokenizer found (neither the data.tokenizer of its '
      'config.json nor a tokenizer.model beside it or above it); pass the SentencePiece model it '
      'was trained with: --tokenizer PATH (Python: tokenizer=PATH)')


def test_resume_on_other_data_or_tokenizer_is_refused(tmp_path):
  """A resume read the store's train split from its saved position whatever the store now held
  (another store, a sample replaced, rows added): the run record names what the run read, by
  content (`rundir.run_inputs`), and a resume on anything else is refused; a moved copy of the
  store passes. Without config.json the newest step's own config is compared."""
  import json
  import shutil
  from radfm_jax.data.ingest import ingest
  (tmp_path / 'd').mkdir()
  store = cd.png_store(tmp_path / 'd')
  tok = str(tmp_path / 'd' / 'tok.model')
  base = SMALL + [f'data.tokenizer={tok}', 'data.batch_size_2d=8']
  cfg = load_config(SPEC, base + [f'data.store={store}'])
  inputs = rundir.run_inputs(cfg)
  assert inputs['train_samples'] == 4 and len(inputs['train_sha256']) == 64
  _fake_run(tmp_path / 'run', cfg)
  folder = tmp_path / 'run' / 'checkpoints'
  rundir.write_record(str(folder), rundir.record(cfg, None, inputs))
  ckpt = str(folder)

  def check(store_path, tokenizer=tok, extra=()):
    c = load_config(SPEC, SMALL + [f'data.tokenizer={tokenizer}', 'data.batch_size_2d=8',
                                   f'data.store={store_path}', *extra])
    rundir.check_same_run(rundir.record(c, None, rundir.run_inputs(c)), ckpt, 'run')

  check(store)
  moved = tmp_path / 'moved'
  shutil.copytree(store, moved)
  check(str(moved))                                     # the same content elsewhere
  changed = tmp_path / 'changed'
  shutil.copytree(store, changed)
  rows = [json.loads(line) for line in open(tmp_path / 'd' / 'samples.jsonl')]
  rows[1]['answer'] = 'Two nodules.'
  (tmp_path / 'd' / 'samples2.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  ingest(str(tmp_path / 'd' / 'samples2.jsonl'), str(changed), replace=True,
         log=open(os.devnull, 'w'))
  with pytest.raises(ConfigError, match=re.escape(
      f"workdir run holds a run trained on other data: the train split of data.store='{changed}'"
      " (data.manifest='its manifest.jsonl') now has 4 samples, sha256 ")):
    check(str(changed))
  other = tmp_path / 'other.model'
  other.write_bytes(cd.spm_proto(vocab_size=300))
  with pytest.raises(ConfigError, match=re.escape(
      f"config field data.tokenizer='{other}': differs from the tokenizer workdir run trained "
      f"with (sha256 {inputs['tokenizer_sha256'][:12]})")):
    check(store, tokenizer=str(other))
  # config.json lost: the newest step's saved config (Orbax's JSON item) is the record
  (folder / '4' / 'config').mkdir()
  (folder / '4' / 'config' / 'metadata').write_text((folder / 'config.json').read_text())
  (folder / 'config.json').unlink()
  with pytest.raises(ConfigError, match='train.learning_rate=0.0001, you asked for 0.01'):
    check(store, extra=['train.learning_rate=0.01'])
  check(store)
  # Synthetic batches resumed on a store, and back: the steps hold the other kind of data
  # position (none would restore, and the message blamed the checkpoint).
  synthetic = load_config(SPEC, SMALL + ['data.store=synthetic', 'data.batch_size_2d=8'])
  with pytest.raises(ConfigError, match=re.escape(
      f"config field data.store='synthetic': workdir run holds a run trained on the store "
      f"{store}; use another --workdir (a run does not switch between synthetic batches and a "
      'store)')):
    rundir.check_same_run(rundir.record(synthetic, None), ckpt, 'run')
  _fake_run(tmp_path / 'synth', synthetic)
  with pytest.raises(ConfigError, match=re.escape(
      f"config field data.store='{store}': workdir synth holds a run trained on synthetic "
      'batches; use another --workdir')):
    rundir.check_same_run(rundir.record(cfg, None, inputs),
                          str(tmp_path / 'synth' / 'checkpoints'), 'synth')


def test_a_run_that_fails_before_its_state_leaves_the_workdir_as_it_was(tmp_path):
  """The tokenizer's copy and the run record are written once the state is restored or
  initialised: a fresh run stopped by a config the model refuses left WORKDIR/tokenizer.model
  (and the corrected rerun with another tokenizer was refused as 'differs from the tokenizer this
  run trained with'); a resume whose steps did not restore had rewritten config.json first (and
  the next resume was compared with that). A config that freezes every trainable parameter is
  one line naming train.freeze (was XLA's 'Need at least one array to stack')."""
  (tmp_path / 'd').mkdir()
  store = cd.png_store(tmp_path / 'd')
  tok = str(tmp_path / 'd' / 'tok.model')
  run = tmp_path / 'run'
  base = STORE_SMALL + [f'data.store={store}', f'data.tokenizer={tok}', 'data.batch_size_2d=8',
                        'train.steps=4']
  with pytest.raises(ConfigError, match="pattern 'nomatch/.*' matches no parameter"):
    loop.train(load_config(SPEC, base + ["train.lr_multipliers=[['nomatch/.*', 2.0]]"]),
               str(run), max_steps=0, progress=False)
  assert not (run / 'tokenizer.model').exists()
  assert not (run / 'checkpoints' / 'config.json').exists()
  loop.train(load_config(SPEC, base), str(run), max_steps=0, progress=False)   # saves step 0
  assert (run / 'tokenizer.model').read_bytes() == open(tok, 'rb').read()
  record = (run / 'checkpoints' / 'config.json').read_bytes()
  for item in (run / 'checkpoints' / '0').iterdir():         # no step restores now
    if item.is_dir():
      import shutil
      shutil.rmtree(item)
  with pytest.raises(Exception, match='restores'):
    loop.train(load_config(SPEC, base + ['train.steps=6']), str(run), max_steps=0,
               progress=False)
  assert (run / 'checkpoints' / 'config.json').read_bytes() == record     # train.steps=4 still
  for freeze, method in ((['vision_tower', 'decoder', 'figure_tokens'], 'full'),
                         (['decoder'], 'lora')):
    cfg = load_config(SPEC + (',finetune=lora' if method == 'lora' else ''),
                      [f'train.freeze={freeze!r}'])
    why = ('' if method == 'full' else " (finetune.method='lora': its adapters and "
           "finetune.train_full=[])")
    with pytest.raises(ConfigError, match=re.escape(
        f'config field train.freeze={freeze!r}: freezes every parameter the run would train'
        f'{why}; expected some left to train')):
      loop.build(cfg)
