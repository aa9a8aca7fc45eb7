"""Training loop: exact resume, cross-mesh restore, non-finite stop, outputs (signals: the CLI
runs of test_train_run.py)."""

import json
import os
import re

import jax
import numpy as np
import pytest

from radfm_jax.config import load_config
from radfm_jax.train import loop
from radfm_jax.checkpoint import Checkpointer, read_step_config
from radfm_jax.train.metrics import read_metrics, train_step_flops
from radfm_jax.train.synthetic import SyntheticBatches

# One worker: the 6-step run (`full_run`) and its compiled step are made once and reused.
pytestmark = pytest.mark.xdist_group('train_loop')

SPEC = 'configs/radfm.py:model=tiny,mesh=cpu'
OVERRIDES = ['data.store=synthetic', 'data.batch_size_2d=8', 'train.synthetic_length=48',
             'train.steps=6', 'train.warmup_steps=1', 'train.learning_rate=1e-3',
             'train.checkpoint_every=2', 'train.log_every=1', 'train.async_checkpoint=True']


def _cfg(*extra):
  return load_config(SPEC, OVERRIDES + list(extra))


def _numpy(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  """The uninterrupted 6-step run on the default mesh (fsdp over 8 devices)."""
  workdir = str(tmp_path_factory.mktemp('full'))
  result = loop.train(_cfg(), workdir, progress=False)
  return workdir, result, _numpy(result.state)


def test_resume_gives_the_uninterrupted_losses(full_run, tmp_path):
  full_dir, full, full_state = full_run
  assert full.status == 'done' and full.step == 6 and sorted(full.losses) == [1, 2, 3, 4, 5, 6]
  first = loop.train(_cfg(), str(tmp_path), max_steps=3, progress=False)
  assert first.step == 3 and first.last_checkpoint == 3
  second = loop.train(_cfg(), str(tmp_path), progress=False)      # resumes from step 3
  assert sorted(second.losses) == [4, 5, 6]
  for s in (1, 2, 3):
    assert first.losses[s] == full.losses[s]
  for s in (4, 5, 6):
    assert second.losses[s] == full.losses[s], (s, second.losses[s], full.losses[s])
  for a, b in zip(_numpy(second.state), full_state):
    np.testing.assert_array_equal(a, b)
  # Outputs: metrics (JSONL), TensorBoard events, the config with the checkpoint and in the run's
  # one config.json (checkpoints/config.json: no second copy in the workdir), the loss curve.
  rows = read_metrics(full_dir, 'train')
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert rows[-1]['loss'] == full.losses[6] and rows[-1]['tokens_per_s'] > 0
  assert {'token_accuracy', 'sequence_accuracy', 'grad_norm', 'learning_rate'} <= set(rows[0])
  events = os.listdir(os.path.join(full_dir, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events)
  assert read_step_config(os.path.join(full_dir, 'checkpoints'))['train']['steps'] == 6
  with open(os.path.join(full_dir, 'checkpoints', 'config.json')) as f:
    record = json.load(f)
  assert (record['layout'], record['train']['steps'], record['model']['size'],
          record['data']['store']) == ('train_state', 6, 'tiny', 'synthetic')
  assert sorted(os.listdir(full_dir)) == ['checkpoints', 'loss_curve.png', 'metrics.jsonl',
                                          'tensorboard']


def test_checkpoint_restores_onto_another_mesh(full_run):
  full_dir, _, full_state = full_run
  cfg = _cfg("mesh.ici=[['data', 2], ['fsdp', 2], ['tensor', 2]]", 'mesh.rules=fsdp_tp')
  mesh, rules, _, _, abs_state, shardings = loop.build(cfg)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  data = SyntheticBatches(cfg)
  ckpt = Checkpointer(os.path.join(full_dir, 'checkpoints'))
  state, config = ckpt.restore(None, abs_state, data)
  ckpt.close()
  assert int(state.step) == 6 and data.get_state() == {'index': 6}
  assert config['mesh']['rules'] == 'fsdp'
  for a, b in zip(_numpy(state), full_state):
    np.testing.assert_array_equal(a, b)
  for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert x.sharding == sh
  lm_head = state.params['llama']['lm_head']['kernel'][...]
  assert lm_head.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')


class _Poisoned:
  """Synthetic batches with NaN images from batch `bad` on."""

  def __init__(self, cfg, bad):
    self.inner, self.bad = SyntheticBatches(cfg), bad

  def __iter__(self):
    return self

  def __next__(self):
    index = self.inner.index
    batch = next(self.inner)
    if index >= self.bad:
      batch['images'] = np.full_like(batch['images'], np.nan)
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(full_run, tmp_path):
  _, full, _ = full_run
  cfg = _cfg()
  with pytest.raises(loop.NonFiniteLossError, match=r'step 5 .*Last good checkpoint: step 4'):
    loop.train(cfg, str(tmp_path), data=_Poisoned(cfg, bad=4), progress=False)
  mesh, _, _, _, abs_state, _ = loop.build(cfg)
  ckpt = Checkpointer(os.path.join(str(tmp_path), 'checkpoints'))
  assert ckpt.latest_step() == 4
  state, _ = ckpt.restore(4, abs_state)
  ckpt.close()
  assert all(np.isfinite(x).all() for x in _numpy(state.params))
  # The good checkpoint resumes like the clean run.
  resumed = loop.train(cfg, str(tmp_path), progress=False)
  assert resumed.losses[5] == full.losses[5] and resumed.losses[6] == full.losses[6]


def test_another_copy_of_the_data_reuses_the_built_run():
  """Where the data lives (store, manifest, tokenizer) is not part of what the loop caches per
  config (built state, initial state, compiled steps): a run over a sharded copy of a store or a
  URL to it compiles nothing again; any other field still builds anew."""
  here = loop.build(_cfg('data.store=/a/store', 'data.tokenizer=/a/tok.model'))
  there = loop.build(_cfg('data.store=gs://b/store', 'data.manifest=/b/m.jsonl',
                          'data.tokenizer=/b/tok.model'))
  assert there is here
  assert loop.build(_cfg('data.store=/a/store', 'data.image_cache=True',
                         "train.freeze=['vision_tower']", 'model.vision.dropout=0.0',
                         'data.random_crop_2d=False')) is not here


def test_run_dirs(monkeypatch):
  monkeypatch.setenv('RADFM_LOGDIR', '/tmp/logs')
  assert loop.run_dirs('gs://bucket/runs/r1/') == ('gs://bucket/runs/r1/', '/tmp/logs/r1')
  assert loop.run_dirs('runs/r1') == (os.path.abspath('runs/r1'),) * 2


def test_cli_overrides_and_flops():
  from radfm_jax.cli.main import parse
  args = parse(['train', '--config', SPEC, '--workdir', 'w', '--config.train.steps=7',
                '--config.train.freeze', 'vision', '--config.train.warmup_steps=0'])
  overrides = args.overrides                       # in command-line order: applied in order
  assert overrides == ['train.steps=7', 'train.freeze=vision', 'train.warmup_steps=0']
  cfg = load_config(SPEC, overrides)
  assert cfg.train.steps == 7 and cfg.train.freeze == ('vision',)
  # 13B decoder, one 2048-token sequence: 6 * N * tokens (N without the embedding table) plus
  # full attention 3 * 2 * 2 * L^2 * E * layers, lm_head included in N.
  m = load_config('configs/radfm.py:model=radfm_13b').model
  l = m.llama
  dense = l.num_layers * (4 * l.hidden_size ** 2 + 3 * l.hidden_size * l.intermediate_size) + (
      l.hidden_size * l.vocab_size)
  attention = l.num_layers * 2 * 2 * 2048 ** 2 * l.hidden_size
  flops = train_step_flops(m, 1, 0, (32, 32, 4), 2048)
  np.testing.assert_allclose(flops, 3 * (2 * dense * 2048 + attention), rtol=1e-9)


def _ynn_fusions(hlo: str) -> tuple[int, int]:
  """(YNNPACK fusions, the elementwise ones among them) in compiled HLO. XLA's defaults give
  YNNPACK dots, convolutions and reductions (103 fusions, 0 elementwise, in the step below);
  an elementwise fusion holds none of those."""
  bodies = dict(re.findall(r'^(?:ENTRY )?%([\w.-]+) [^\n]*\{\n(.*?)^\}', hlo, re.M | re.S))
  called = re.findall(r'^\s*(?:ROOT )?%ynn_fusion[.\d]* = .*?calls=%([\w.-]+)', hlo, re.M)
  plain = [c for c in called
           if not re.search(r' (?:dot|convolution|reduce|reduce-window)\(', bodies[c])]
  return len(called), len(plain)


def test_mesh_xla_options_compile_into_the_step(tmp_path):
  """`mesh.xla_options` are the compiler options of the train step as the loop and `aot` build
  it: with YNNPACK given the elementwise fusions too the compiled step holds elementwise YNNPACK
  fusions (XLA's defaults give YNNPACK none of those), with YNNPACK's fusions off it holds none, and
  an option XLA does not know fails the run as one ConfigError naming the field and the option,
  before any step."""
  from radfm_jax import sharding
  from radfm_jax.config import ConfigError
  from radfm_jax.data.batch import batch_sharding
  from radfm_jax.tpu import batch_shapes
  from radfm_jax.train import step as step_lib
  from radfm_jax.train.aot import abstract_batch

  def ynn_fusions(*extra):
    cfg = _cfg(*extra)
    # One device: the options reach the step the same way on any mesh, and the 8-device
    # partitioned step would take ~25 s to compile per variant on 2 cores.
    mesh, rules, graphdef, tx, abs_state, shardings = loop.build(
        cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, cfg), shardings, mesh,
                                   rules, cfg.mesh.xla_options)
    images, length = batch_shapes(cfg, '2d', 8, 1, 48)
    batch = abstract_batch(images, length, batch_sharding(mesh, rules))
    return _ynn_fusions(step.lower(abs_state, batch).compile().as_text())

  total, elementwise = ynn_fusions("mesh.xla_options=[['xla_cpu_experimental_ynn_fusion_type', "
                                   "'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                                   "LIBRARY_FUSION_TYPE_ELTWISE']]")
  assert 0 < elementwise < total
  assert ynn_fusions("mesh.xla_options=[['xla_cpu_experimental_ynn_fusion_type', "
                     "'LIBRARY_FUSION_TYPE_INVALID']]") == (0, 0)
  bad = _cfg("mesh.xla_options=[['xla_cpu_no_such_option', True]]")
  with pytest.raises(ConfigError) as err:
    loop.train(bad, str(tmp_path), progress=False, verbose=False)
  message = str(err.value)
  assert message.startswith('config field mesh.xla_options: XLA refused it')
  assert "No such compile option: 'xla_cpu_no_such_option'" in message and '\n' not in message
  assert read_metrics(str(tmp_path)) == []


def _run_with_lost_scans(tmp_path, lost: int, *extra):
  """A `tiny` run over a real 8-scan store whose manifest names, for `lost` of its 8 samples, a
  scan the store does not hold. Returns (overrides of the run, the manifest rows)."""
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  import conftest_data as cd
  from radfm_jax.data.ingest import ingest
  from radfm_jax.data.store import VolumeStore
  rng = np.random.default_rng(0)
  records = []
  for i in range(8):              # one shape: one bucket, one batch of 8, one compile
    np.save(tmp_path / f'v{i}.npy', rng.normal(0, 100, (40, 36, 8)).astype(np.float32))
    records.append({'id': f's{i}', 'question': f'What is in scan {i}?', 'answer': 'Normal.',
                    'split': 'train', 'images': [{'path': f'v{i}.npy', 'id': f'v{i}'}]})
  ingest(cd.write_manifest(tmp_path / 'samples.jsonl', records), str(tmp_path / 'store'),
         log=open(os.devnull, 'w'))
  rows = VolumeStore(str(tmp_path / 'store')).manifest()
  gone = [dict(r, id=f'gone{i}', images=[dict(r['images'][0], id=f'no_such_scan{i}')])
          for i, r in enumerate(rows[:lost])]
  manifest = tmp_path / 'with_gone.jsonl'
  manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows[lost:] + gone))
  tok = tmp_path / 'tok.model'
  tok.write_bytes(cd.spm_proto())
  return cd.frozen_vision_overrides(tmp_path / 'store', tok, f'data.manifest={manifest}',
                                    'train.log_every=1', *extra)


def test_unreadable_samples_are_said_listed_and_counted(tmp_path, capsys):
  """A sample whose scan the store cannot give (`data.drop_unreadable`, the default) becomes an
  empty row, and training says so: a line per skipped sample on stderr, every one in
  skipped.jsonl, the count in metrics.jsonl and in the TrainResult. Nothing is dropped silently."""
  overrides = _run_with_lost_scans(tmp_path, 1, 'train.steps=2')
  result = loop.train(load_config(SPEC, overrides), str(tmp_path / 'run'), progress=False)
  err = capsys.readouterr().err
  assert result.step == 2, err
  # 8 samples, one batch of 8 per step: 'gone0' is skipped at each of the 2 steps
  assert [s['sample_id'] for s in result.skipped] == ['gone0', 'gone0']
  assert result.skipped[0]['scan_id'] == 'no_such_scan0' and result.skipped[0]['reason']
  listed = [json.loads(line) for line in open(tmp_path / 'run' / 'skipped.jsonl')]
  assert listed == result.skipped
  assert err.count("radfm-jax train: skipped sample 'gone0': scan 'no_such_scan0' could not be "
                   "read (") == 2, err
  assert (f'2 samples skipped for an unreadable scan (their rows left empty), listed in '
          f'{tmp_path / "run" / "skipped.jsonl"}') in err
  counts = [row['skipped_samples'] for row in read_metrics(str(tmp_path / 'run'))
            if 'skipped_samples' in row]
  # the pipeline reads ahead of the step, so a row counts what it has skipped by then
  assert len(counts) == 2 and counts == sorted(counts) and counts[-1] == 2


def test_a_store_that_gives_too_few_scans_stops_the_run_with_a_checkpoint(tmp_path):
  """Half the samples unreadable (a store moved or damaged wholesale) is more than
  `data.max_unreadable_share` (0.1): the run stops with one line naming the share, the list and
  the first scan, after saving a checkpoint, instead of training on empty rows to the end."""
  from radfm_jax.errors import InputError
  overrides = _run_with_lost_scans(tmp_path, 4, 'train.steps=8')
  with pytest.raises(loop.UnreadableDataError) as err:
    loop.train(load_config(SPEC, overrides), str(tmp_path / 'run'), progress=False,
               verbose=False)
  message = str(err.value)
  assert isinstance(err.value, InputError) and '\n' not in message
  listed = [json.loads(line) for line in open(tmp_path / 'run' / 'skipped.jsonl')]
  # 4 of each batch of 8 skipped: the share is enforced from the 10th skipped, so the third
  # batch's read trips it; that batch trains, and the run stops before the next
  step = int(re.match(r'stopped at step (\d+) \(checkpoint saved in ', message).group(1))
  assert 3 <= step < 8 and len(listed) >= 10, message
  drawn = re.search(r': (\d+) of the (\d+) samples drawn were unreadable \(50%, more than '
                    r'data.max_unreadable_share=0.1\), listed in ', message)
  assert drawn and int(drawn.group(2)) == 2 * int(drawn.group(1)), message
  assert f"listed in {tmp_path / 'run' / 'skipped.jsonl'}; the first: scan 'no_such_scan" in message
  assert message.endswith('expected a store that gives the scans its manifest names (re-run '
                          '`radfm-jax ingest` to restore lost arrays, or check data.store / '
                          'data.manifest)')
  assert Checkpointer(str(tmp_path / 'run' / 'checkpoints')).latest_step() == step
  # The same data with the check off trains to the end, every skip still listed
  result = loop.train(load_config(SPEC, overrides + ['data.max_unreadable_share=1.0']),
                      str(tmp_path / 'run2'), progress=False, verbose=False)
  assert result.step == 8 and len(result.skipped) >= 32
