"""The demo: dataset builder (real package scans + phantoms), ingest, and `radfm-jax demo --quick`."""

import json
import os

import numpy as np
import pytest

from radfm_jax.data import demo as demo_data
from radfm_jax.data.store import VolumeStore, read_jsonl


def test_phantom_lesion_side_and_size():
  rng = np.random.default_rng(0)
  for side in ('left', 'right'):
    for _ in range(5):
      vol, label = demo_data.make_phantom(rng, lesion=True, side=side)
      assert vol.shape == demo_data.PHANTOM_SHAPE and label.lesion and label.side == side
      assert 15 <= label.diameter_mm <= 30
      bright = np.argwhere(vol > 0.7)
      assert len(bright) > 0
      # RAS voxel order: H (axis 0) grows towards the patient's right.
      mid = vol.shape[0] / 2
      assert (bright[:, 0].mean() > mid) == (side == 'right')
  vol, label = demo_data.make_phantom(rng, lesion=False)
  assert not label.lesion and label.side is None and (vol > 0.7).sum() == 0
  findings, impression = label.report()
  assert 'No focal lesion' in findings and impression == 'Normal study.'


def test_real_sources_from_core_packages_are_found():
  found, _ = demo_data.available_sources()
  packages = {src.pip for src, _ in found}
  assert {'pydicom', 'nibabel'} <= packages        # core dependencies always ship theirs
  for src, path in found:
    if src.pip in ('pydicom', 'nibabel'):
      arr = demo_data.read_source(src, path)
      assert arr.ndim == (src.dims if arr.shape[-1] != 3 else 3)
      aug = demo_data.augment_real(arr, src.dims, np.random.default_rng(1))
      assert aug.shape[:2] == (64, 64) and 0.0 <= aug.min() and aug.max() <= 1.0


@pytest.fixture(scope='module')
def quick_dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('demo_data'))
  sizes = demo_data.DemoSizes.quick()
  summary = demo_data.build_demo_dataset(out, sizes, seed=0)
  return out, sizes, summary


def test_dataset_counts_splits_and_labels(quick_dataset):
  out, sizes, summary = quick_dataset
  records = read_jsonl(os.path.join(out, 'samples.jsonl'))
  used = {s['name'] for s in summary['sources']}
  sources = [s for s in demo_data.REAL_SOURCES if s.name in used]
  with_body = sum(s.body_part is not None for s in sources)
  per_copy = len(sources) + with_body
  real_train = per_copy * sizes.copies_train
  real_heldout = per_copy * sizes.copies_heldout
  assert summary['splits'] == {'train': real_train + sizes.phantoms_train,
                               'heldout': real_heldout + sizes.phantoms_heldout}
  assert len(records) == summary['samples'] and len({r['id'] for r in records}) == len(records)
  phantoms = [r for r in records if r['family'] == 'phantom']
  assert sum(r['split'] == 'heldout' for r in phantoms) == sizes.phantoms_heldout
  for r in phantoms:
    label = r['label']
    if r['task'] == 'diagnosis_yes_no':
      assert r['answer'] == ('yes' if label['lesion'] else 'no') and r['options'] == ['yes', 'no']
    elif r['task'] == 'vqa':
      assert label['lesion'] and r['answer'] == label['side'] and r['options'] == ['left', 'right']
    else:
      assert r['task'] == 'report' and r['kind'] == 'open'
      assert r['answer'].startswith('Findings: ') and 'Impression: ' in r['answer']
      if label['lesion']:
        assert f"{label['diameter_mm']} mm" in r['answer'] and label['side'] in r['answer']
  real = [r for r in records if r['family'] == 'real']
  by_name = {s.name: s for s in demo_data.REAL_SOURCES}
  for r in real:
    src = by_name[r['source']]
    assert r['answer'] in r['options']
    assert r['answer'] == (src.modality if r['task'] == 'modality' else src.body_part)
  # Every closed question's answer is one of its options, and both yes and no occur.
  assert {r['answer'] for r in phantoms if r['task'] == 'diagnosis_yes_no'} == {'yes', 'no'}


def test_ingest_stores_every_scan(quick_dataset, tmp_path):
  from radfm_jax.data.ingest import ingest
  out, _, summary = quick_dataset
  report = ingest(os.path.join(out, 'samples.jsonl'), str(tmp_path / 'store'), strict=True)
  images = {im['path'] for r in read_jsonl(os.path.join(out, 'samples.jsonl')) for im in r['images']}
  assert len(report.stored) == len(images) and not report.rejects
  assert report.samples == summary['samples']
  store = VolumeStore(str(tmp_path / 'store'))
  manifest = store.manifest()
  phantom = next(r for r in manifest if r['family'] == 'phantom')
  assert phantom['images'][0]['shape'] == [1, 64, 64, 16]
  arr = store.read(phantom['images'][0]['id'])
  assert arr.shape == (1, 64, 64, 16) and arr.dtype == np.int16 and arr.max() > 0
  xray = next(r for r in manifest if r['family'] == 'real' and r['answer'] == 'X-ray')
  assert xray['images'][0]['shape'] == [1, 64, 64, 1]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
  from radfm_jax.cli import main as cli
  out = str(tmp_path / 'demo')
  assert cli.main(['demo', '--quick', '--out', out, '--no-progress']) == 0
  with open(os.path.join(out, 'summary.json')) as f:
    s = json.load(f)
  assert s['model'] == 'tiny' and s['steps'] == 20 and not s['stopped_by_time_budget']
  assert s['loss_last10'] < s['loss_first10']            # it learns something in 20 steps
  assert s['ingest']['rejected'] == 0 and s['ingest']['samples'] == sum(s['dataset']['splits'].values())
  for name in ('loss_curve.png', 'predictions.jsonl', 'tokenizer.model', 'train/metrics.jsonl'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert os.path.isdir(s['checkpoint'])
  with open(os.path.join(out, 'train', 'checkpoints', 'config.json')) as f:  # 0.5 of 20 steps
    assert json.load(f)['train']['lr_delays'] == [['llama/layers/.*', 10]]
  m = s['metrics']
  assert m['closed']['phantom/diagnosis_yes_no:yes/no']['chance'] == 0.5
  assert m['closed']['real/modality:CT/MRI/X-ray/ultrasound']['chance'] == 0.25
  for v in m['closed'].values():
    assert 0.0 <= v['accuracy'] <= 1.0 and v['n'] > 0
  assert 0.0 <= m['rouge_l'] <= 1.0
  # The vision diagnostics: one probe per held-out scan (quick: one copy of each real source, 16
  # phantoms); each real source appears once, so 1-NN by source can never be right.
  v = s['vision']
  n_sources = len(s['dataset']['sources'])
  assert v['real']['n'] == n_sources and v['phantom']['n'] == 16
  assert v['real']['separability']['source'] == {'n': n_sources, 'accuracy': 0.0,
                                                 'majority': 1 / n_sources}
  assert set(v['phantom']['separability']) == {'lesion', 'side'}
  for family in ('real', 'phantom'):
    spread = v[family]['spread']
    assert spread['across'] > 0 and spread['ratio'] == pytest.approx(
        spread['across'] / spread['within'])
  assert set(v['towers']) == {'vision', 'perceiver', 'fc', 'figure_tokens', 'llama'}
  assert all(t['grad_norm_first'] > 0 and t['update_ratio_last'] > 0 for t in v['towers'].values())
  preds = read_jsonl(os.path.join(out, 'predictions.jsonl'))
  assert len(preds) == s['dataset']['splits']['heldout']
  # --resume of the finished run trains no step and reports the losses it logged, not nan.
  assert cli.main(['demo', '--quick', '--out', out, '--no-progress', '--resume']) == 0
  with open(os.path.join(out, 'summary.json')) as f:
    again = json.load(f)
  logged = [r['loss'] for r in read_jsonl(os.path.join(out, 'train', 'metrics.jsonl'))
            if r['split'] == 'train' and 'loss' in r]
  assert again['steps'] == 20 and len(logged) >= 2
  assert again['loss_first10'] == pytest.approx(np.mean(logged[:10]))
  assert again['loss_last10'] == pytest.approx(np.mean(logged[-10:]))


def test_curriculum_switches_source_and_resumes():
  from radfm_jax.demo import Curriculum

  class Counter:
    def __init__(self, tag):
      self.tag, self.n = tag, 0

    def __next__(self):
      self.n += 1
      return (self.tag, self.n)

    def get_state(self):
      return {'n': self.n}

    def set_state(self, state):
      self.n = state['n']

  it = Curriculum(Counter('closed'), Counter('all'), 2)
  assert [next(it) for _ in range(4)] == [('closed', 1), ('closed', 2), ('all', 1), ('all', 2)]
  state = json.loads(json.dumps(it.get_state()))           # saved by the checkpointer as JSON
  again = Curriculum(Counter('closed'), Counter('all'), 2)
  again.set_state(state)
  assert next(again) == ('all', 3)


def test_heldout_answers_decode_by_the_config_generate_section(tmp_path):
  """`answer_heldout` (the demo's held-out answers) decodes with every cfg.generate field, as
  generate / eval do: --config.generate.temperature and its kin were accepted and ignored."""
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  import conftest_data as cd
  from radfm_jax.config import load_config
  from radfm_jax.demo import _batch_for_generation, answer_heldout
  from radfm_jax.infer.generate import generate_ids
  from radfm_jax.models.radfm import create_model
  store = VolumeStore(cd.png_store(tmp_path, n=2))
  records, tok = store.manifest(), cd.tokenizer()
  model = create_model(cd.tiny_model(), seed=1)
  sampled = ['data.max_images=1', 'generate.max_new_tokens=4', 'generate.stop_ids=[]',
             'generate.temperature=5.0', 'generate.layer_loop=scan']
  cfg = load_config('radfm:model=tiny', sampled)
  batch = _batch_for_generation(records, store, tok, cfg, 16)
  out = generate_ids(model, batch['tokens'], batch['attention_mask'], batch['images'],
                     batch['image_mask'], sampling=cfg.generate)
  want = [tok.decode(seq).strip() for seq in out.sequences()[:len(records)]]
  assert answer_heldout(model, records, store, tok, cfg) == want
  greedy = load_config('radfm:model=tiny', sampled + ['generate.temperature=0.0'])
  assert answer_heldout(model, records, store, tok, greedy) != want


def test_demo_flags_and_config_are_checked_before_any_data(tmp_path, capsys):
  """--steps 0 (ran the experiment's steps), --time-budget -5 (trained nothing) or nan (no
  limit) are usage errors; a warmup the user gave is never replaced (it was silently cut to a
  tenth of the steps), and a bad config value fails before the dataset is built."""
  from radfm_jax.cli.main import main
  from radfm_jax.config import ConfigError
  from radfm_jax.demo import setup
  out = tmp_path / 'demo'
  for flag, value, want in [('--steps', '0', 'a positive integer'),
                            ('--time-budget', '-5', 'a number of seconds >= 0'),
                            ('--time-budget', 'nan', 'a number of seconds >= 0')]:
    with pytest.raises(SystemExit) as e:
      main(['demo', '--quick', '--out', str(out), flag, value])
    assert e.value.code == 2 and f"argument {flag}: '{value}': expected {want}" in (
        capsys.readouterr().err)
  assert main(['demo', '--quick', '--out', str(out), '--config.train.warmup_steps=30']) == 2
  assert capsys.readouterr().err.strip() == (
      'radfm-jax demo: config field train.warmup_steps=30: expected 0 <= warmup_steps < '
      'train.steps=20, or -1 (automatic: min(100, steps // 10))')
  with pytest.raises(ConfigError, match=r'^config field train.steps=0: expected a positive'):
    setup(str(out), quick=True, steps=0)
  assert not (out / 'data').exists() and not (out / 'store').exists()
