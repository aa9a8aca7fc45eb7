"""The batch contract (data/batch.py): the sharding spec follows the rule table, one record gives
the same images and prompt tokens in the training, generation and eval batches, and a model with
8 perceiver latents trains from a store end to end."""

import dataclasses
import math
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import conftest_data as cd
from radfm_jax import sharding
from radfm_jax.config import ConfigError, MeshConfig, check_batch_processes, load_config
from radfm_jax.data import batch as batch_lib
from radfm_jax.data import pipeline
from radfm_jax.data.ingest import ingest
from radfm_jax.data.store import VolumeStore
from radfm_jax.data.tokenizer import Tokenizer, image_ids

SPEC = 'configs/radfm.py:model=tiny,mesh=cpu'

# Images in the question only: generation keeps them where training has them.
RECORDS = [
    {'id': 'two_2d', 'task': 'vqa', 'question': 'Is there a nodule in the left lung?',
     'answer': 'Yes', 'images': [{'path': 'a.png', 'position': {'question': 0}},
                                 {'path': 'b.png', 'position': {'question': 9}}]},
    {'id': 'ct', 'task': 'vqa', 'question': 'Can you describe the abnormality?',
     'answer': 'A large mass with oedema.',
     'images': [{'path': 'ct.nii.gz', 'position': {'question': 0}, 'modality': 'CT'}]},
]


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  d = tmp_path_factory.mktemp('batch')
  rng = np.random.default_rng(0)
  cd.write_png(d / 'a.png', rng.integers(0, 255, (40, 36), dtype=np.uint8))
  cd.write_png(d / 'b.png', rng.integers(0, 255, (30, 44), dtype=np.uint8))
  cd.write_nifti(d / 'ct.nii.gz', cd.ct_volume((20, 18, 10), seed=3))
  records = list(RECORDS)
  for i in range(6):       # more 2D samples for the training run
    cd.write_png(d / f'x{i}.png', rng.integers(0, 255, (24 + 4 * i, 32), dtype=np.uint8))
    records.append({'id': f'x{i}', 'task': 'vqa', 'question': f'What is in image {i}?',
                    'answer': 'The image shows a nodule in the left lung.',
                    'images': [{'path': f'x{i}.png', 'position': {'question': 0}}]})
  ingest(cd.write_manifest(d / 'samples.jsonl', records), str(d / 'store'),
         log=open(os.devnull, 'w'))
  (d / 'tok.model').write_bytes(cd.spm_proto())
  return VolumeStore(str(d / 'store')), str(d / 'tok.model')


# ------------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize('preset', sorted(sharding.LOGICAL_RULES))
def test_batch_spec_is_the_act_batch_rule(preset):
  rules = sharding.LOGICAL_RULES[preset]
  assert batch_lib.batch_spec(rules) == P(dict(rules)['act_batch']) == P(('data', 'fsdp'))
  mesh = sharding.make_mesh(MeshConfig(ici=(('data', 2), ('fsdp', 2), ('tensor', 2)),
                                       rules=preset))
  assert batch_lib.batch_shards(mesh, rules) == 4
  assert batch_lib.batch_sharding(mesh, rules).spec == P(('data', 'fsdp'))


def test_batch_spec_follows_a_changed_table():
  rules = tuple((k, 'data' if k == 'act_batch' else v) for k, v in sharding.LOGICAL_RULES['fsdp'])
  mesh = sharding.make_mesh(MeshConfig(ici=(('data', 2), ('fsdp', 4), ('tensor', 1))))
  assert batch_lib.batch_spec(rules) == P('data')
  assert batch_lib.batch_shards(mesh, rules) == 2
  x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
  arr = jax.device_put(x, batch_lib.batch_sharding(mesh, rules))
  assert {s.data.shape for s in arr.addressable_shards} == {(2, 3)}     # split 2 ways, not 8


# 2 processes x 4 devices where the processes differ only along `tensor` (mesh.dcn tensor=2):
# both would hold every row of the batch, each with rows of its own.
ACROSS_TENSOR = MeshConfig(ici=(('data', 2), ('fsdp', 2), ('tensor', 1)),
                           dcn=(('data', 1), ('fsdp', 1), ('tensor', 2)))
ACROSS_TENSOR_ERROR = (
    "config fields mesh.ici=[['data', 2], ['fsdp', 2], ['tensor', 1]] / mesh.dcn=[['data', 1], "
    "['fsdp', 1], ['tensor', 2]]: processes 0 and 1 both hold rows [0, 1) of the global batch of "
    '4, but each process reads rows of its own, which would be joined as one replicated batch; '
    'expected the mesh batch axes data x fsdp to split the batch across processes (e.g. the '
    'multi-process size on data or fsdp, not tensor)')


def test_batch_rows_of_two_processes_never_overlap_fabricated():
  """`check_batch_processes` on a hand-written index map (devices are plain names here)."""
  rows = [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)]
  index_map = {f'd{i}': (rows[i % 4],) for i in range(8)}         # d0..d3 and d4..d7: same rows
  with pytest.raises(ConfigError) as e:
    check_batch_processes(index_map, {f'd{i}': i // 4 for i in range(8)}, ACROSS_TENSOR, 4)
  assert str(e.value) == ACROSS_TENSOR_ERROR
  # the rows split across the processes (each row replicated inside one process): accepted
  good = {f'd{i}': i % 2 for i in range(8)}          # row r held (twice) by process r % 2
  assert check_batch_processes(index_map, good, ACROSS_TENSOR, 4) is None
  # one process, any replication: accepted
  assert check_batch_processes(index_map, dict.fromkeys(index_map, 0), ACROSS_TENSOR, 4) is None
  assert check_batch_processes({'d0': ()}, {'d0': 0}, MeshConfig(), 2) is None   # replicated


def test_batch_rows_check_on_a_real_sharding():
  """The index map of a real 8-device batch sharding (data=2 x fsdp=2 x tensor=2): processes
  that differ only along tensor (as mesh.dcn tensor=2 would place them) are refused; processes
  along data are accepted; the one-process mesh itself passes `loop.check_batch_rows`."""
  from radfm_jax.train import loop
  mesh_cfg = MeshConfig(ici=(('data', 2), ('fsdp', 2), ('tensor', 2)))
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.LOGICAL_RULES['fsdp']
  index_map = batch_lib.batch_sharding(mesh, rules).devices_indices_map((4,))
  grid = np.asarray(mesh.devices)                     # [data, fsdp, tensor]
  by_tensor = {d: t for (_, _, t), d in np.ndenumerate(grid)}
  by_data = {d: a for (a, _, _), d in np.ndenumerate(grid)}
  with pytest.raises(ConfigError) as e:
    check_batch_processes(index_map, by_tensor, ACROSS_TENSOR, 4)
  assert str(e.value) == ACROSS_TENSOR_ERROR
  assert check_batch_processes(index_map, by_data, mesh_cfg, 4) is None
  cfg = load_config('radfm:model=tiny,mesh=cpu', ["mesh.ici=[['data', 2], ['fsdp', 2], "
                                                   "['tensor', 2]]"])
  assert loop.check_batch_rows(cfg, mesh, rules) is None


def test_empty_batch_is_the_contract():
  b = batch_lib.empty_batch(3, 2, (8, 8, 4), 16)
  assert {k: v.dtype.type for k, v in b.items()} == batch_lib.DTYPES
  assert tuple(b) == batch_lib.KEYS
  assert b['images'].shape == (3, 2, 3, 8, 8, 4) and b['image_mask'].shape == (3, 2)
  assert (b['labels'] == batch_lib.IGNORE).all() and batch_lib.IGNORE == -100
  assert not b['tokens'].any() and not b['loss_weights'].any()


# ------------------------------------------------------------------------------------------------
# One record, three batches


def _generation_batch(store, record, tok, data_cfg, image_shape='train'):
  """The demo's held-out generation batch of one record (one row), its images in the training
  bucket (generate.image_shape='train'; the default 'original' is the original's test-time one)."""
  from radfm_jax import demo
  cfg = load_config(SPEC, [f'generate.image_shape={image_shape}'])
  cfg = dataclasses.replace(cfg, data=data_cfg)
  return demo._batch_for_generation([record], store, tok, cfg, 1)


def test_pipeline_generation_and_eval_batches_agree(store):
  from radfm_jax.eval import harness
  from radfm_jax.infer import text
  vs, _ = store
  tok, model_cfg = cd.tokenizer(), cd.tiny_model()
  data_cfg = cd.data_config()
  by_id = {r['id']: r for r in vs.manifest()}
  samples = {s.record['id']: s for s in harness.load_samples(vs.root)}
  for rid in ('two_2d', 'ct'):
    rec = by_id[rid]
    gen = _generation_batch(vs, rec, tok, data_cfg)
    assert gen['images'].shape[1] == data_cfg.max_images      # the demo's slot count
    n = len(rec['images'])
    # Training: the pipeline's batch over this one record (row 0 real, the others empty).
    train = cd.model_inputs(next(iter(pipeline.make_dataset(
        data_cfg, model_cfg, vs, tok, records=[rec], process_index=0, process_count=1,
        num_epochs=1))))
    # Eval: the harness's question + the text-level batch generation takes.
    sample = samples[rid]
    arrays, mods, entries, stacked = harness.read_sample_images(sample)
    question, reference, used = harness.format_question(sample, entries, 32, data_cfg.max_images)
    ev = text.prepare_batch(tok, [question], [arrays], model_cfg, data_cfg, modalities=[mods],
                            stacked=[stacked], image_shape='train')
    assert used == n and reference == rec['answer']

    prompt = tok.encode(question)
    # The same prompt ids: the training row starts with them (and they carry no loss) ...
    np.testing.assert_array_equal(train['tokens'][0, :len(prompt)], prompt)
    assert (train['labels'][0, :len(prompt)] == batch_lib.IGNORE).all()
    assert (train['labels'][0, len(prompt):] != batch_lib.IGNORE).any()
    # ... and both generation batches end with exactly them (left padded).
    for batch, row in ((gen, 0), (ev, 0)):
      np.testing.assert_array_equal(batch['tokens'][row, -len(prompt):], prompt)
      assert batch['attention_mask'][row].sum() == len(prompt)
    # n images, each as its 32 placeholder ids, in manifest order.
    want_ids = [i for k in range(n) for i in image_ids(tok, k)]
    got_ids = [i for i in prompt if i >= tok.image_token_offset]
    assert got_ids == want_ids
    # The same pixels in the first n slots; empty slots are zero and masked.
    for batch, row in ((train, 0), (gen, 0), (ev, 0)):
      np.testing.assert_array_equal(batch['images'][row, :n], train['images'][0, :n])
      assert batch['image_mask'][row, :n].all() and not batch['image_mask'][row, n:].any()
      assert not batch['images'][row, n:].any()
    # The one function makes the pipeline's row.
    row = batch_lib.record_inputs(rec, [vs.read(im['id']) for im in rec['images']], tok, data_cfg)
    for key in batch_lib.KEYS:
      np.testing.assert_array_equal(row[key], train[key][0])
  assert train['images'].shape[3:] == (16, 16, 8)              # the CT: single-sample 3D bucket
  # generate.image_shape='original' (the default): the original's test-time stacking, no collator
  for batch in (_generation_batch(vs, rec, tok, data_cfg, 'original'),
                text.prepare_batch(tok, [question], [arrays], model_cfg, data_cfg,
                                   modalities=[mods], stacked=[stacked])):
    assert batch['images'].shape[3:] == (data_cfg.image_size_2d,) * 2 + (8,)


def test_record_inputs_errors_name_the_record(store):
  vs, _ = store
  rec = next(r for r in vs.manifest() if r['id'] == 'two_2d')
  with pytest.raises(ValueError, match="record 'two_2d': 1 image arrays for 2 manifest images"):
    batch_lib.record_inputs(rec, [vs.read(rec['images'][0]['id'])], cd.tokenizer(),
                            cd.data_config())


# ------------------------------------------------------------------------------------------------
# Training with a non-default latent count


def test_tiny_with_8_latents_trains_from_a_store(store, tmp_path):
  from radfm_jax.train import loop
  vs, tok_path = store
  # One bucket (2D, one image, 128 positions): one compiled step; 6 samples + 2 empty rows.
  manifest = cd.write_manifest(tmp_path / 'train.jsonl',
                               [r for r in vs.manifest() if r['id'].startswith('x')])
  cfg = load_config(SPEC, ['model.perceiver.num_latents=8', f'data.store={vs.root}',
                           f'data.manifest={manifest}', f'data.tokenizer={tok_path}',
                           'data.batch_size_2d=8',
                           'data.text_lengths=[128]', 'train.steps=5', 'train.warmup_steps=1',
                           'train.learning_rate=3e-3', 'train.log_every=1',
                           'train.tensorboard=False', 'train.async_checkpoint=False',
                           'train.checkpoint_every=0'])
  tok = Tokenizer(tok_path, max_images=cfg.model.max_images, num_latents=8)
  data = loop.make_data(cfg)
  batches = [next(data) for _ in range(2)]
  rows = 0
  for b in batches:
    for r in range(b['tokens'].shape[0]):
      n = int(b['image_mask'][r].sum())
      got = [int(i) for i in b['tokens'][r] if i >= tok.image_token_offset]
      assert got == [i for k in range(n) for i in image_ids(tok, k)]   # 8 ids per image
      rows += n > 0
  assert rows > 0
  result = loop.train(cfg, str(tmp_path / 'run'), progress=False)
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
  # Random init: near-uniform logits over the 512 text ids. Step 1 runs at learning rate 0
  # (warmup), then every step lowers the loss (measured 6.24, 6.24, 5.64, 5.22, 4.96).
  assert losses[0] == pytest.approx(math.log(cfg.model.llama.vocab_size), abs=0.1)
  assert all(b < a for a, b in zip(losses[1:], losses[2:])), losses
  assert losses[-1] < losses[0] - 0.5, losses
