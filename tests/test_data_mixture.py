"""The training mixture (data.mixture): per-dataset shares of the drawn samples, the default
proportional to size, 2D and 3D never in one batch, exact resume, config errors, and the shares
the training loop writes to metrics.jsonl."""

import collections
import json
import os

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.config import ConfigError, load_config, mixture_weights
from radfm_jax.data import pipeline
from radfm_jax.data.ingest import ingest
from radfm_jax.data.store import VolumeStore

SIZES = {'a': 4, 'b': 8, 'c': 4}        # a, b: 2D PNGs; c: 3D CT volumes


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  d = tmp_path_factory.mktemp('mix')
  rng = np.random.default_rng(0)
  records = []
  for name in ('a', 'b'):
    for i in range(SIZES[name]):
      cd.write_png(d / f'{name}{i}.png', rng.integers(0, 255, (40, 36), dtype=np.uint8))
      records.append({'id': f'{name}{i}', 'dataset': name, 'task': 'vqa',
                      'question': f'What is in image {i}?', 'answer': 'A nodule.',
                      'images': [{'path': f'{name}{i}.png'}]})
  for i in range(SIZES['c']):
    cd.write_nifti(d / f'c{i}.nii.gz', cd.ct_volume((20, 18, 6), seed=i))
    records.append({'id': f'c{i}', 'dataset': 'c', 'task': 'vqa', 'question': 'Lesion?',
                    'answer': 'No.', 'images': [{'path': f'c{i}.nii.gz', 'modality': 'CT'}]})
  manifest = cd.write_manifest(d / 'samples.jsonl', records)
  with open(os.devnull, 'w') as log:
    ingest(manifest, str(d / 'store'), log=log)
  return VolumeStore(str(d / 'store'))


def _make(store, mixture=None, seed=0, num_epochs=None, **cfg):
  return pipeline.make_dataset(cd.data_config(**cfg), cd.tiny_model(), store, cd.tokenizer(),
                               seed=seed, process_index=0, process_count=1,
                               num_epochs=num_epochs, mixture=mixture)


def _planned(plan, start, stop):
  """Samples per dataset in global batches [start, stop) of the plan."""
  counts = collections.Counter()
  for index in range(start, stop):
    epoch, j = divmod(index, plan.num_batches)
    counts.update(plan.datasets[r] for r in plan.epoch(epoch)[j][1] if r >= 0)
  return counts


def test_default_draws_every_sample_once_per_epoch_proportional_to_size(store):
  ds = _make(store, num_epochs=2)
  plan = ds.plan
  assert plan.targets == {'a': 0.25, 'b': 0.5, 'c': 0.25}        # sizes 4, 8, 4 of 16
  assert plan.num_batches == 6 + 4                              # 12 2D by 2, 4 3D by 1
  for epoch in range(2):
    rows = [r for _, rs in plan.epoch(epoch) for r in rs if r >= 0]
    assert sorted(rows) == list(range(16))
  assert len(list(ds)) == 20
  assert ds.stats.datasets == {'a': 8, 'b': 16, 'c': 8}         # what was yielded, counted
  assert ds.stats.shares() == {'a': 0.25, 'b': 0.5, 'c': 0.25}
  assert plan.describe() == ('mixture proportional to size (data.mixture empty): a 4 (25.0%), '
                             'b 8 (50.0%), c 4 (25.0%)')


def test_weights_set_the_shares_of_the_drawn_samples(store):
  # a: 2 of 4 weight units -> 8 of the 16 draws per epoch (each of its 4 samples twice),
  # b: 4 (half of its 8 samples), c: 4 (each once).
  mixture = {'a': 2.0, 'b': 1.0, 'c': 1.0}
  ds = _make(store, mixture)
  plan = ds.plan
  assert plan.targets == {'a': 0.5, 'b': 0.25, 'c': 0.25}
  assert plan.num_batches == 6 + 4
  for epoch in range(3):
    rows = collections.Counter(r for _, rs in plan.epoch(epoch) for r in rs if r >= 0)
    by_set = collections.Counter()
    for r, n in rows.items():
      by_set[plan.datasets[r]] += n
    assert by_set == {'a': 8, 'b': 4, 'c': 4}
    assert {rows[r] for r in range(4)} == {2}                  # every a sample exactly twice
    assert len([r for r in range(4, 12) if rows[r]]) == 4      # 4 distinct b samples, once each
    assert all(rows[r] <= 1 for r in range(4, 16))
  it = iter(ds)
  for _ in range(3 * plan.num_batches):                        # 3 epochs: exact shares
    next(it)
  assert ds.stats.datasets == {'a': 24, 'b': 12, 'c': 12}
  # A run that stops inside an epoch: each share within 0.05 of its weight (after k full epochs
  # exact; the partial epoch moves a share by at most its draws / samples drawn so far).
  for _ in range(17):
    next(it)
  shares = ds.stats.shares()
  assert ds.stats.datasets == _planned(plan, 0, 47)             # what the plan says was drawn
  for name, target in plan.targets.items():
    assert abs(shares[name] - target) <= 0.05, (name, shares)
  assert plan.describe() == ('mixture (data.mixture): a 4 weight 2 -> 50.0%, b 8 weight 1 -> '
                             '25.0%, c 4 weight 1 -> 25.0%')


def test_2d_and_3d_never_share_a_batch_under_mixing(store):
  ds = _make(store, {'a': 1.0, 'b': 3.0, 'c': 2.0}, num_epochs=2)
  plan = ds.plan
  kinds = collections.Counter()
  for batch, (key, rows) in zip(ds, plan.epoch(0) + plan.epoch(1)):
    real = [r for r in rows if r >= 0]
    assert {plan.keys[r] for r in real} == {key}                # one bucket, so one kind
    assert {plan.datasets[r] for r in real} <= ({'a', 'b'} if key.kind == '2d' else {'c'})
    assert batch['images'].shape[0] == (2 if key.kind == '2d' else 1)
    assert batch['images'].shape[-1] == key.depth
    kinds[key.kind] += len(real)
  # 16 draws per epoch: a 16/6 -> 3 (2.67 rounds up), b 8, c 5.33 -> 5 (largest remainders)
  assert kinds == {'2d': 2 * 11, '3d': 2 * 5}


def test_the_mixture_mixes_datasets_within_a_batch(store):
  plan = _make(store, {'a': 1.0, 'b': 1.0, 'c': 0.0}, seed=3).plan
  mixed = [rows for key, rows in plan.epoch(0) if len({plan.datasets[r] for r in rows}) > 1]
  assert mixed                                                 # as the original's concatenation
  assert all(plan.datasets[r] != 'c' for _, rows in plan.epoch(0) for r in rows if r >= 0)


def test_hosts_agree_on_every_batch_under_mixing(store):
  plans = [pipeline.make_dataset(cd.data_config(), cd.tiny_model(), store, cd.tokenizer(), seed=2,
                                 process_index=p, process_count=2,
                                 mixture={'a': 2.0, 'b': 1.0, 'c': 1.0}).plan for p in range(2)]
  assert plans[0].num_batches == plans[1].num_batches
  drawn = collections.Counter()
  for (k0, r0), (k1, r1) in zip(plans[0].epoch(0), plans[1].epoch(0)):
    assert k0 == k1                            # the same bucket on both hosts at every step
    drawn.update(plans[0].datasets[r] for r in r0 + r1 if r >= 0)
  assert drawn == {'a': 8, 'b': 4, 'c': 4}      # the epoch's draws, split between the hosts


def test_mixture_is_deterministic_and_resumes_exactly(store):
  mixture = {'a': 2.0, 'b': 1.0, 'c': 1.0}
  order = [tuple(rows) for _, rows in _make(store, mixture, seed=5).plan.epoch(1)]
  assert order == [tuple(rows) for _, rows in _make(store, mixture, seed=5).plan.epoch(1)]
  assert order != [tuple(rows) for _, rows in _make(store, mixture, seed=6).plan.epoch(1)]
  it = iter(_make(store, mixture, seed=5))
  for _ in range(13):                                          # past the first epoch (10 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(8)]
  resumed_ds = _make(store, mixture, seed=5)
  resumed = iter(resumed_ds)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(8)]
  for x, y in zip(expected, got):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert resumed_ds.stats.datasets == _planned(resumed_ds.plan, 13, 21)


def test_weights_the_split_cannot_use_are_config_errors(store):
  with pytest.raises(ConfigError) as e:
    _make(store, {'a': 1.0, 'b': 1.0, 'c': 1.0, 'slake': 2.0})
  assert str(e.value) == ("config field data.mixture: dataset 'slake' has no samples in this "
                          'split; expected datasets of the split: a (4), b (8), c (4)')
  with pytest.raises(ConfigError) as e:
    _make(store, {'a': 1.0, 'c': 1.0})
  assert str(e.value) == ("config field data.mixture: no weight for dataset 'b' (8 samples); "
                          'expected a weight for every dataset of the split (a (4), b (8), '
                          'c (4); 0 leaves one out)')


def test_mixture_config_field():
  cfg = load_config('radfm:model=tiny', ["data.mixture={'vqa_rad': 2, 'slake': 0.5}"])
  assert mixture_weights(cfg.data) == {'vqa_rad': 2.0, 'slake': 0.5}
  assert load_config('radfm:model=tiny', ["data.mixture=[['x', 1]]"]).data.mixture == (('x', 1),)
  assert mixture_weights(load_config('radfm:model=tiny').data) is None
  with pytest.raises(ConfigError, match=r"^config field data.mixture=\[\['a', -1\]\]: expected a "
                     r'mapping dataset -> weight \(a finite number >= 0\)'):
    load_config('radfm:model=tiny', ["data.mixture={'a': -1}"])
  with pytest.raises(ConfigError, match=r"^config field data.mixture=\{'a': 0\}: expected at "
                     'least one weight > 0$'):
    load_config('radfm:model=tiny', ["data.mixture={'a': 0}"])


def test_training_writes_the_drawn_shares(store, tmp_path, capfd):
  """A tiny run on the 2D datasets (one bucket, batch 4 on one device): every logged row's
  drawn/<dataset> equals the samples of that step's batch in the plan, share/<dataset> their
  running fraction, and the end line prints them beside the targets."""
  import jax

  from radfm_jax import sharding
  from radfm_jax.train import loop
  from radfm_jax.train.metrics import read_metrics
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', [r for r in store.manifest()
                                                      if r['dataset'] != 'c'])
  tok = tmp_path / 'tok.model'
  tok.write_bytes(cd.spm_proto())
  steps = 6
  cfg = load_config('radfm:model=tiny', [
      f'data.store={store.root}', f'data.manifest={manifest}', f'data.tokenizer={tok}',
      'data.batch_size_2d=4', 'data.text_lengths=[128]', "data.mixture={'a': 3, 'b': 1}",
      f'train.steps={steps}', 'train.log_every=1', 'train.tensorboard=False',
      'train.checkpoint_every=0', 'train.async_checkpoint=False'])
  one = sharding.make_mesh(cfg.mesh, jax.devices()[:1])       # one device: a cheaper compile
  result = loop.train(cfg, str(tmp_path / 'run'), progress=False, mesh=one)
  assert result.step == steps
  plan = pipeline.make_dataset(
      cfg.data, cfg.model, store, cd.tokenizer(), seed=cfg.seed, process_index=0,
      process_count=1, records=[r for r in store.manifest() if r['dataset'] != 'c'],
      mixture=mixture_weights(cfg.data)).plan
  assert plan.targets == {'a': 0.75, 'b': 0.25}                # 12 draws: a 9, b 3
  rows = read_metrics(str(tmp_path / 'run'), 'train')
  assert [r['step'] for r in rows] == list(range(1, steps + 1))
  total = collections.Counter()
  for r in rows:
    want = _planned(plan, r['step'] - 1, r['step'])
    total += want
    assert {k: r[f'drawn/{k}'] for k in ('a', 'b')} == {k: want[k] for k in ('a', 'b')}
    assert r['share/a'] == total['a'] / sum(total.values())
  assert total == {'a': 18, 'b': 6}                            # 2 epochs of 12: exactly 3:1
  assert plan.num_batches == 3                                 # 12 draws by 4: no empty rows
  err = capfd.readouterr().err
  assert 'mixture (data.mixture): a 4 weight 3 -> 75.0%, b 8 weight 1 -> 25.0%' in err
  assert ('samples drawn per dataset (this call): a 18 (75.0%, target 75.0%), '
          'b 6 (25.0%, target 25.0%)') in err
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    assert json.loads(f.readline())['drawn/a'] >= 0


def test_a_dataset_named_default_next_to_samples_without_one_is_refused(store):
  """Samples without a dataset are dataset 'default' (their data.mixture weight, share/default):
  records (a TFDS split, or `records=`) that also name a dataset 'default' would share that
  weight and count; refused with one line naming the records."""
  from radfm_jax.errors import InputError
  records = [dict(r) for r in store.manifest()]
  records[0].pop('dataset')
  records[5]['dataset'] = 'default'
  with pytest.raises(InputError) as e:
    pipeline.make_dataset(cd.data_config(), cd.tiny_model(), store, cd.tokenizer(),
                          process_index=0, process_count=1, records=records)
  assert str(e.value) == ('manifest record 6 field dataset: "default" is also the name of the '
                          'group of samples without a dataset (e.g. manifest record 1), so the '
                          'two would be counted as one; expected another dataset name, or a '
                          'dataset on every sample')
