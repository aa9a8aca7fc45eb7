"""Text-level generation, checkpoint loading (converted and trained layouts) and `radfm-jax generate`."""

import dataclasses
import json
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))

import conftest_data as cd  # noqa: E402
from radfm_jax import api  # noqa: E402
from radfm_jax.cli.main import main  # noqa: E402
from radfm_jax.config import DataConfig, GenerateConfig  # noqa: E402
from radfm_jax.data import prompts, transforms  # noqa: E402
from radfm_jax.errors import InputError, UserError  # noqa: E402
from radfm_jax.infer import prompt_files, text  # noqa: E402
from radfm_jax.infer.generate import generate_ids  # noqa: E402

# One worker runs the whole module, so the module fixtures are built once (make test: loadgroup).
pytestmark = pytest.mark.xdist_group('generate_cli')

NEW = 4   # new tokens everywhere: one compiled decode loop per prompt bucket


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A tiny random model saved with the converter's writer, its tokenizer, a NIfTI and a PNG."""
  from radfm_jax.models.radfm import create_model
  root = tmp_path_factory.mktemp('gen')
  model = create_model(cd.tiny_model(), seed=1)
  api.save(model, str(root / 'ckpt'))
  with open(root / 'tok.model', 'wb') as f:
    f.write(cd.spm_proto())
  vol = cd.ct_volume((20, 18, 10), seed=2)
  cd.write_nifti(root / 'a.nii.gz', vol)
  png = (np.random.default_rng(3).random((24, 20)) * 255).astype(np.uint8)
  cd.write_png(root / 'b.png', png)
  loaded, cfg = api.load(str(root / 'ckpt'))
  return root, model, loaded, cfg, cd.tokenizer()


def _params(model):
  return {k: np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


# ------------------------------------------------------------------------------------------------
# Prompt and image preparation (no model needed)


def test_place_image_markers():
  block0, block1 = prompts.image_block(0, 2), prompts.image_block(1, 2)
  assert block0 == '<image><image0><image1></image>'
  assert text.place_image_markers('A <image> B <image>?', 2, 2) == f'A {block0} B {block1}?'
  assert text.place_image_markers('Any lesion?', 2, 2) == block0 + block1 + 'Any lesion?'
  assert text.place_image_markers('No images', 0, 2) == 'No images'
  formatted = f'{block0}What?'
  assert text.place_image_markers(formatted, 1, 2) == formatted      # already expanded
  with pytest.raises(ValueError, match='2 <image> markers but 1 images'):
    text.place_image_markers('<image> and <image>', 1, 2)
  with pytest.raises(ValueError, match='1 image blocks but 2 images'):
    text.place_image_markers(formatted, 2, 2)
  # Image tokens written as text that are not whole blocks of the given images: the tokenizer
  # would read them as placeholders with no image behind them (was: the prompt used as is).
  for prompt, images, token in [('What is <image3>?', 0, '<image3>'),
                                ('Look <image> at <image7>', 1, '<image>'),
                                (f'{block0} and </image>', 1, '</image>'),
                                (f'{block1}What?', 1, '<image>')]:
    with pytest.raises(InputError, match=f"prompt holds '{token}' outside whole image blocks"):
      text.place_image_markers(prompt, images, 2)
  assert text.place_image_markers('<image 3> and <image03>', 0, 2) == '<image 3> and <image03>'


def test_as_chw_d_shapes():
  assert text.as_chw_d(np.zeros((5, 6))).shape == (1, 5, 6, 1)
  assert text.as_chw_d(np.zeros((5, 6, 7))).shape == (1, 5, 6, 7)
  assert text.as_chw_d(np.zeros((3, 5, 6, 7))).shape == (3, 5, 6, 7)
  with pytest.raises(ValueError, match='expected'):
    text.as_chw_d(np.zeros((2, 5, 6, 7)))


def test_data_config_for_clamps_to_the_vision_tower():
  dc = text.data_config_for(cd.tiny_model())        # tiny: 64 x 64 x 16
  assert (dc.image_size_2d, dc.image_size_3d_single) == (64, 64)
  assert dc.depth_buckets == (4, 8, 12, 16)


def test_prepare_batch_values():
  tok, cfg = cd.tokenizer(), cd.tiny_model()
  vol = cd.ct_volume((20, 18, 10), seed=0)[None]
  img = np.arange(12 * 10, dtype=np.float32).reshape(1, 12, 10, 1)
  batch = text.prepare_batch(tok, ['Is there a nodule? <image>', 'Compare <image> <image>'],
                             [[vol], [img, vol]], cfg, modalities=[['CT'], ['', 'CT']])
  tokens, mask = batch['tokens'], batch['attention_mask']
  assert tokens.shape == mask.shape and tokens.shape[1] % 64 == 0
  ids0 = tok.encode(text.place_image_markers('Is there a nodule? <image>', 1))
  np.testing.assert_array_equal(tokens[0, -len(ids0):], ids0)          # left padded
  assert mask[0].sum() == len(ids0) and mask[0, -1] == 1 and (tokens[0, :-len(ids0)] == 0).all()
  # batch of 2: in-plane image_size_2d, depth bucket of the deepest scan (10 -> 8 in 4..16).
  assert batch['images'].shape == (2, 2, 3, 64, 64, 8)
  np.testing.assert_array_equal(batch['image_mask'], [[True, False], [True, True]])
  assert (batch['images'][0, 1] == 0).all()
  dc = text.data_config_for(cfg)
  want = transforms.prepare_images([img, vol], ['', 'CT'], (64, 64, 8), dc)
  np.testing.assert_array_equal(batch['images'][1], want)
  assert batch['images'].min() >= 0.0 and batch['images'].max() <= 1.0   # radfm min-max
  none = text.prepare_batch(tok, ['hello'], None, cfg)
  assert none['images'] is None and none['image_mask'] is None


def _original_test_input(volume, size, buckets):
  """torch transcription of the original's test-time image path (src/test.py: no collator):
  min-max over the case, then stack_images: F.interpolate (legacy nearest) to (512, 512, D) with D
  the D_list bucket of the depth (ties to the smaller), grey copied to 3 channels."""
  import torch
  x = torch.from_numpy(volume.astype(np.float32))                   # [C=1, H, W, D]
  x = (x - x.min()) / (x.max() - x.min())
  depth, target = max(4, x.shape[3]), buckets[0]
  for b in buckets:
    if abs(b - depth) < abs(target - depth):
      target = b
  y = torch.nn.functional.interpolate(x[None], size=(size, size, target))[0]
  return y.expand(3, -1, -1, -1).numpy()


def test_generation_image_shape_is_the_originals_whatever_the_batch():
  """generate.image_shape='original' (default): a prompt's 3D scan goes in as the original's
  test script stacks it (data.image_size_2d in-plane, the full depth buckets) for one prompt as
  for two; before, one prompt got the training collator's reduced in-plane size (32 here, 256 at
  the released size) and a batch of two the full one. 'train' is the training bucket."""
  tok, cfg = cd.tokenizer(), cd.tiny_model()
  dc = text.data_config_for(cfg)
  vol = cd.ct_volume((20, 18, 10), seed=0)[None]
  want = _original_test_input(vol, dc.image_size_2d, dc.depth_buckets)
  assert want.shape == (3, 64, 64, 8)
  one = text.prepare_batch(tok, ['Is there a nodule? <image>'], [[vol]], cfg)
  two = text.prepare_batch(tok, ['Is there a nodule? <image>'] * 2, [[vol], [vol]], cfg)
  np.testing.assert_array_equal(one['images'][0, 0], want)
  np.testing.assert_array_equal(two['images'][1, 0], want)
  train = text.prepare_batch(tok, ['x <image>'], [[vol]], cfg, image_shape='train')
  assert train['images'].shape[3:] == (dc.image_size_3d_single,) * 2 + (8,)
  from radfm_jax.config import load_config
  sampling = load_config('radfm:model=tiny', ['generate.image_shape=train']).generate
  assert sampling.image_shape == 'train'


def test_tokenizer_model_mismatch_is_an_error():
  from radfm_jax.data.tokenizer import Tokenizer
  small = Tokenizer(cd.spm_proto(300))
  with pytest.raises(ValueError, match='300 SentencePiece pieces but the model vocabulary is 512'):
    text.prepare_batch(small, ['x'], None, cd.tiny_model())


# ------------------------------------------------------------------------------------------------
# Checkpoints


def test_save_load_converted_layout(setup):
  root, model, loaded, cfg, _ = setup
  assert cfg == model.cfg
  with open(root / 'ckpt' / 'config.json') as f:
    assert json.load(f)['layout'] == 'params'
  want, got = _params(model), _params(loaded)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert loaded.llama.layers.q.kernel[...].sharding.mesh.size == len(jax.devices())


def test_checkpoint_record_and_tokenizer_lookup(setup, tmp_path):
  """A folder inside a checkpoint is not taken for the checkpoint (only its step folders, their
  items and params/ climb to its record); the lookups of a checkpoint's tokenizer and data
  config refuse a path that is not a checkpoint; a run moved away from where its config's
  data.tokenizer points takes its own copy, not what now lies at the old path."""
  root = setup[0]
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(root / 'ckpt', ckpt)
  (ckpt / 'finetuned' / 'params.partial').mkdir(parents=True)       # a killed save inside it
  for call in (api.load, api.find_tokenizer, api.read_data_config):
    with pytest.raises(InputError) as e:                            # was: the parent's model
      call(str(ckpt / 'finetuned'))
    assert str(e.value).startswith(
        f'{ckpt}/finetuned: not a checkpoint ({ckpt}/finetuned/config.json: not found, only what '
        'a save that did not finish left there); expected a checkpoint folder'), e.value
  _, cfg = api.load(str(ckpt / 'params'))                    # params/ climbs to its record
  assert cfg == setup[1].cfg
  for call in (api.find_tokenizer, api.read_data_config):           # was: None, as for a checkpoint
    with pytest.raises(InputError, match='nope: not a checkpoint \\(no such folder\\)'):
      call(str(tmp_path / 'nope'))
  # runA's tokenizer path recorded, the run moved to runB, another tokenizer now at runA's path
  moved = tmp_path / 'runB'
  shutil.copytree(ckpt, moved, ignore=shutil.ignore_patterns('finetuned'))
  record = json.loads((moved / 'config.json').read_text())
  old = tmp_path / 'runA' / 'tokenizer.model'
  record['data'] = {'tokenizer': str(old)}
  (moved / 'config.json').write_text(json.dumps(record))
  old.parent.mkdir()
  old.write_bytes(cd.spm_proto(300))
  (moved / 'tokenizer.model').write_bytes(cd.spm_proto())
  assert api.find_tokenizer(str(moved)) == str(moved / 'tokenizer.model')   # was: runA's
  (moved / 'tokenizer.model').unlink()
  assert api.find_tokenizer(str(moved)) == str(old)                # no copy: the path it names


def test_load_trained_layout(setup, tmp_path):
  """A TrainState saved by the training Checkpointer loads by workdir, checkpoints/ or step."""
  from radfm_jax.config import load_config
  from radfm_jax.train import optim
  from radfm_jax.checkpoint import Checkpointer
  from radfm_jax.train.step import init_train_state
  _, model, _, _, _ = setup
  run_cfg = load_config('configs/radfm.py:model=tiny,mesh=cpu', ['data.image_size_2d=32'])
  params = nnx.state(model, nnx.Param)
  state = init_train_state(params, optim.make_optimizer(run_cfg.train, params))
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(7, state, config=run_cfg.to_dict())
  ckpt.close()
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(run_cfg.to_dict(), f, default=str)
  step_dir = tmp_path / 'checkpoints' / '7'
  with open(tmp_path / 'checkpoints' / 'config.json') as f:
    assert json.load(f)['layout'] == 'train_state'
  want = _params(model)
  for where, step in ((tmp_path, None), (tmp_path / 'checkpoints', None), (tmp_path, 7),
                      (step_dir, None)):
    loaded, cfg = api.load(str(where), step=step)
    assert cfg == model.cfg
    got = _params(loaded)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  data_cfg = api.read_data_config(str(tmp_path))
  assert data_cfg.image_size_2d == 32 and isinstance(data_cfg.depth_buckets, tuple)
  assert api.read_data_config(str(setup[0] / 'ckpt')) is None
  # The tokenizer beside the run is found; the run's preprocessing comes with it.
  assert api.find_tokenizer(str(tmp_path)) is None
  (tmp_path / 'tokenizer.model').write_bytes(cd.spm_proto())
  assert api.find_tokenizer(str(step_dir)) == str(tmp_path / 'tokenizer.model')
  _, tok, dc = api.load_for_generation(str(tmp_path), intensity='percentile')
  assert tok.vocab_size == 512 and tok.max_images == model.cfg.max_images
  assert (dc.image_size_2d, dc.intensity) == (32, 'percentile')
  with pytest.raises(FileNotFoundError, match='no step 8'):
    api.load(str(tmp_path), step=8)


# ------------------------------------------------------------------------------------------------
# Generation


def test_generate_matches_generate_ids(setup):
  root, _, model, cfg, tok = setup
  vol = cd.ct_volume((20, 18, 10), seed=2)
  out, ids = text.generate_batch(model, tok, ['Is there a nodule? <image>'], [[vol]],
                                 max_new_tokens=NEW, return_ids=True)
  batch = text.prepare_batch(tok, ['Is there a nodule? <image>'], [[vol]], cfg)
  ref = generate_ids(model, batch['tokens'], batch['attention_mask'], batch['images'],
                     batch['image_mask'], max_new_tokens=NEW)
  assert ids == ref.sequences() and 1 <= len(ids[0]) <= NEW
  assert out == [tok.decode(ids[0]).strip()]
  assert api.generate(model, tok, 'Is there a nodule? <image>', [vol], max_new_tokens=NEW) == out[0]
  # one prompt's (text, ids) with return_ids (before: the batch's list of texts)
  assert api.generate(model, tok, 'Is there a nodule? <image>', [vol], max_new_tokens=NEW,
                      return_ids=True) == (out[0], ids[0])
  # the image changes the answer's logits path: a different scan gives the same *shapes* only
  assert isinstance(out[0], str)


def test_batched_rows_equal_single_prompts(setup):
  _, _, model, _, tok = setup
  vol = cd.ct_volume((20, 18, 10), seed=2)
  p = ['Is there a nodule? <image>', 'Describe the abnormality seen in the brain MRI <image>']
  _, single0 = text.generate_batch(model, tok, p[:1], [[vol]], max_new_tokens=NEW, return_ids=True)
  _, single1 = text.generate_batch(model, tok, p[1:], [[vol]], max_new_tokens=NEW, return_ids=True)
  _, both = text.generate_batch(model, tok, p, [[vol], [vol]], max_new_tokens=NEW,
                                return_ids=True)
  assert both == single0 + single1


def test_cli_single_prompt(setup, capsys):
  root, _, model, _, tok = setup
  rc = main(['generate', '--checkpoint', str(root / 'ckpt'), '--tokenizer', str(root / 'tok.model'),
             '--image', str(root / 'a.nii.gz'), '--image', str(root / 'b.png'),
             '--prompt', 'Compare <image> with <image>.',
             f'--config.generate.max_new_tokens={NEW}'])
  assert rc == 0
  printed = capsys.readouterr().out.strip()
  from radfm_jax.data.readers import read_scan
  scans = [read_scan(str(root / n))[0][0] for n in ('a.nii.gz', 'b.png')]
  want = api.generate(model, tok, 'Compare <image> with <image>.', scans, max_new_tokens=NEW)
  assert printed == want


def test_cli_file_mode(setup, tmp_path):
  root, _, model, _, tok = setup
  items = [{'id': 'q1', 'prompt': 'Is there a nodule? <image>', 'images': [str(root / 'a.nii.gz')]},
           {'id': 'q2', 'prompt': 'What is shown?', 'images': [], 'answer': 'a lung',
            'dataset': {'name': 'mine'}},         # fields of its own: echoed (were dropped)
           {'id': 'q3', 'prompt': '<image> Yes or no?',
            'images': [{'path': str(root / 'a.nii.gz'), 'modality': 'CT'}]}]
  cd.write_manifest(tmp_path / 'in.jsonl', items)
  rc = main(['generate', '--checkpoint', str(root / 'ckpt'), '--tokenizer', str(root / 'tok.model'),
             '--input', str(tmp_path / 'in.jsonl'), '--output', str(tmp_path / 'out.jsonl'),
             '--batch-size', '2', '--config.generate.max_new_tokens', str(NEW),
             '--config.generate.stop_ids=[2, 1]'])
  assert rc == 0
  rows = [json.loads(line) for line in open(tmp_path / 'out.jsonl')]
  assert [r['id'] for r in rows] == ['q1', 'q2', 'q3']
  assert all(isinstance(r['prediction'], str) and 1 <= r['new_tokens'] <= NEW for r in rows)
  assert {k: v for k, v in rows[1].items() if k not in ('prediction', 'new_tokens')} == items[1]
  assert list(rows[1]) == ['id', 'prompt', 'images', 'answer', 'dataset', 'prediction',
                           'new_tokens']
  # an own field named as one the answer writes would be replaced by it: refused
  cd.write_manifest(tmp_path / 'in2.jsonl', [dict(items[1], prediction='mine')])
  with pytest.raises(InputError, match=re.escape(
      f"{tmp_path / 'in2.jsonl'} line 1 field prediction: a field each answer line writes; "
      'expected another name for a field of your own (answers add prediction, new_tokens)')):
    prompt_files.read_prompts(str(tmp_path / 'in2.jsonl'))
  # Row 3 is batch 2 padded with itself: same as generating it in a batch of two copies.
  from radfm_jax.data.readers import read_scan
  vol = read_scan(str(root / 'a.nii.gz'))[0][0]
  want = text.generate_batch(model, tok, [items[2]['prompt']] * 2, [[vol], [vol]],
                             modalities=[['CT'], ['CT']], max_new_tokens=NEW)
  assert rows[2]['prediction'] == want[0]


def test_an_input_error_mid_run_says_what_was_kept(setup, tmp_path, capsys):
  """An image that exists but does not read (checked up front: existence and headers only) met
  after earlier answers were written: the one line said nothing of OUTPUT.partial, which held
  them (an interrupt said it)."""
  root = setup[0]
  (tmp_path / 'text.nii.gz').write_text('not a scan')
  items = [{'id': 'q1', 'prompt': 'What is shown?', 'images': []},
           {'id': 'q2', 'prompt': 'And here? <image>', 'images': [str(tmp_path / 'text.nii.gz')]}]
  cd.write_manifest(tmp_path / 'in.jsonl', items)
  out = tmp_path / 'out.jsonl'
  rc = main(['generate', '--checkpoint', str(root / 'ckpt'), '--tokenizer', str(root / 'tok.model'),
             '--input', str(tmp_path / 'in.jsonl'), '--output', str(out), '--no-progress',
             '--config.generate.max_new_tokens', str(NEW)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and err[-1].startswith(f'radfm-jax generate: {tmp_path}/in.jsonl line 2 field '
                                        'images[0]: cannot read image'), err
  assert err[-1].endswith(f'(1 of 2 answers kept in {out}.partial; {out} not written)'), err
  assert [json.loads(x)['id'] for x in open(f'{out}.partial')] == ['q1'] and not out.exists()


def test_cli_argument_errors(setup, capsys):
  root = setup[0]
  assert main(['generate', '--checkpoint', str(root / 'ckpt'), '--tokenizer',
               str(root / 'tok.model')]) == 2
  assert 'either --prompt' in capsys.readouterr().err


def test_cli_file_mode_honours_frame_and_index(setup, tmp_path):
  """An image object's `frame` / `index` pick the volume / stack image the ingest reader picks
  (not image 0), and the output echoes the image objects as given."""
  root, _, model, _, tok = setup
  vol = cd.ct_volume((12, 10, 6), seed=4)
  cd.write_nifti(tmp_path / 'perf.nii.gz', np.stack([vol, vol[::-1] * 2, vol + 300], -1))
  case = np.random.default_rng(5).normal(size=(3, 1, 12, 10, 6)).astype(np.float32)
  np.save(tmp_path / 'case.npy', case)
  images = [[{'path': 'perf.nii.gz', 'frame': 1}], [{'path': 'case.npy', 'index': 2}]]
  items = [{'id': f'q{i}', 'prompt': 'Is there a nodule? <image>', 'images': im}
           for i, im in enumerate(images)]
  cd.write_manifest(tmp_path / 'in.jsonl', items)
  rc = main(['generate', '--checkpoint', str(root / 'ckpt'), '--tokenizer', str(root / 'tok.model'),
             '--input', str(tmp_path / 'in.jsonl'), '--output', str(tmp_path / 'out.jsonl'),
             '--batch-size', '2', '--no-progress', f'--config.generate.max_new_tokens={NEW}'])
  assert rc == 0
  rows = [json.loads(line) for line in open(tmp_path / 'out.jsonl')]
  assert [r['images'] for r in rows] == images                # as given, not resolved paths
  from radfm_jax.data.readers import read_scan
  picked = [read_scan(str(tmp_path / 'perf.nii.gz'), {'frame': 1})[0][0], case[2]]
  np.testing.assert_array_equal(picked[0][0], (vol[::-1] * 2))
  want = text.generate_batch(model, tok, [it['prompt'] for it in items], [[p] for p in picked],
                             max_new_tokens=NEW)
  assert [r['prediction'] for r in rows] == want


def test_a_stack_of_several_images_is_never_cut_to_its_first(tmp_path, capsys):
  """A 5D .npy stack [S, C, H, W, D] holds S images and `<image>` takes one: without `index` it
  is an error naming the file, the count and how to pick one (before the model is loaded), in
  the CLI and the Python API alike; an image field the reader would not use is an error too."""
  case = np.random.default_rng(6).normal(size=(2, 1, 8, 8, 4)).astype(np.float32)
  path = str(tmp_path / 'case.npy')
  np.save(path, case)
  flags = ['generate', '--checkpoint', str(tmp_path / 'no-such-ckpt'), '--no-progress']
  assert main(flags + ['--image', path, '--prompt', 'x <image>']) == 2
  assert capsys.readouterr().err == (
      f'radfm-jax generate: --image #1: cannot use image {path}: holds 2 images (a 5D stack '
      '[S, C, H, W, D]); expected one image per <image>: pick it with "index" (0..1) in its '
      'image entry ({"path": ..., "index": N} in a generate --input prompts file)\n')
  lines = [{'id': 'a', 'prompt': 'x', 'images': [{'path': 'case.npy', 'index': 1}]},
           {'id': 'b', 'prompt': 'x', 'images': ['case.npy']}]
  cd.write_manifest(tmp_path / 'in.jsonl', lines)
  assert main(flags + ['--input', str(tmp_path / 'in.jsonl')]) == 2
  assert capsys.readouterr().err.startswith(
      f'radfm-jax generate: {tmp_path}/in.jsonl line 2 field images[0]: cannot use image '
      f'{path}: holds 2 images')
  with pytest.raises(ValueError, match=f'^{path}: holds 2 images'):
    text.as_chw_d(path)
  for entry, message in [({'path': 'case.npy', 'slice': 1},
                          'field images[0].slice: unknown field; expected one of path, modality, '
                          'frame, index'),
                         ({'path': 'case.npy', 'index': -1},
                          'field images[0].index: got -1; expected integer >= 0 and < 2^31')]:
    cd.write_manifest(tmp_path / 'bad.jsonl', [{'id': 'a', 'prompt': 'x', 'images': [entry]}])
    assert main(flags + ['--input', str(tmp_path / 'bad.jsonl')]) == 2
    assert capsys.readouterr().err == f'radfm-jax generate: {tmp_path}/bad.jsonl line 1 {message}\n'


def test_bad_python_arguments_are_one_error_naming_them(setup):
  """What a notebook passes by mistake: each an InputError naming the argument, before anything
  is prepared or compiled. Before: a string of prompts was answered letter by letter, a NaN voxel
  made the whole image NaN (answer ''), modalities 'CT' became ['C', 'T'] and a short list left
  an image without its intensity mapping, an array for `images` was read as its slices."""
  from radfm_jax.data.tokenizer import Tokenizer
  _, model, _, cfg, tok = setup
  vol = cd.ct_volume((20, 18, 10), seed=0).astype(np.float32)
  nan = vol.copy()
  nan[3, 4, 5] = np.nan
  cases = [
      (lambda: text.prepare_batch(tok, 'ab', None, cfg),
       "prompts: got str 'ab'; expected a non-empty list of prompt strings"),
      (lambda: text.prepare_batch(tok, [], None, cfg), 'prompts: got list'),
      (lambda: text.prepare_batch(tok, ['x', 3], None, cfg),
       'prompt 1: got int; expected a string'),
      (lambda: text.prepare_batch(tok, ['x <image>'], [[nan]], cfg),
       'prompt 0 image 0: 1 NaN/inf values; expected finite voxels'),
      (lambda: text.prepare_batch(tok, ['x <image>'], [[vol.astype(complex)]], cfg),
       'prompt 0 image 0: unsupported dtype complex128'),
      (lambda: text.prepare_batch(tok, ['x <image>'], [[vol.astype(np.float64) * 1e300]], cfg),
       'prompt 0 image 0: voxels: value'),
      (lambda: text.prepare_batch(tok, ['x <image>'], [[vol]], cfg, modalities=[[]]),
       'modalities: expected one list per prompt holding one string per image (image counts '
       '[1])'),
      (lambda: text.prepare_batch(tok, ['x'], [[]] * 2, cfg),
       '1 prompts but 2 image lists; expected one list per prompt'),
      (lambda: text.generate(model, tok, 'x <image>', vol, max_new_tokens=2),
       "images: got ndarray; expected a list of the prompt's scans"),
      (lambda: text.generate(model, tok, 'x <image>', [vol], modalities='CT', max_new_tokens=2),
       "modalities: got 'CT'; expected a list, one string per image"),
      (lambda: text.generate_batch(model, tok, ['x'], seed=2**32, max_new_tokens=2),
       'seed 4294967296: expected an integer in [0, 2^32)'),
      (lambda: text.generate_batch(model, tok, ['x', 'y'], names=['a'], max_new_tokens=2),
       "names: expected one name per prompt (2), got ['a']"),
      (lambda: text.generate(model, 'tok.model', 'x', max_new_tokens=2),
       'tokenizer: got str; expected a radfm_jax Tokenizer'),
      (lambda: Tokenizer(b''), 'tokenizer: a SentencePiece model of no pieces'),
      (lambda: Tokenizer(None), 'tokenizer: got NoneType; expected the path of a SentencePiece '
       'tokenizer.model (or its bytes)'),
      # Before: a TypeError / AttributeError / ValueError / IndexError traceback each
      (lambda: text.generate(model, tok, 'x', sampling={'max_new_tokens': 2}),
       'sampling: got dict; expected a radfm_jax.config.GenerateConfig '
       '(radfm_jax.generate_config), or None and keyword arguments'),
      (lambda: text.generate(model, tok, 'x', data_cfg={'intensity': 'radfm'}, max_new_tokens=2),
       "data_cfg: got dict; expected a radfm_jax.config.DataConfig (load_for_generation returns "
       "the checkpoint's), or None"),
      (lambda: text.generate(model, tok, 'x <image>', [vol], max_new_tokens=2,
                             data_cfg=dataclasses.replace(text.data_config_for(cfg),
                                                          intensity='bogus')),
       "config field data.intensity='bogus': expected 'radfm', 'ct_window', 'ct_windows3' or "
       "'percentile'"),
      (lambda: text.generate(model, tok, 'x <image>', [vol], max_new_tokens=2,
                             data_cfg=dataclasses.replace(text.data_config_for(cfg),
                                                          depth_buckets=())),
       'config field data.depth_buckets=[]: expected a non-empty increasing list of positive '
       'multiples of model.vision.frame_patch_size='),
      (lambda: text.generate(model, tok, 'x <image>', [vol], max_new_tokens=2,
                             data_cfg=DataConfig()),     # not clamped to the tiny vision tower
       'config field data.image_size_2d=512: expected a positive multiple of '
       'model.vision.patch_size=16 no larger than model.vision.image_size=64'),
      (lambda: text.generate('ckpt/', tok, 'x', max_new_tokens=2),
       'model: got str; expected a RadFM model (radfm_jax.load or load_for_generation)'),
      # Before: "shape ()"; and stacked 'no' was taken as True
      (lambda: text.generate(model, tok, 'x <image>', [None], max_new_tokens=2),
       'prompt 0 image 0: got NoneType; expected an array ([H, W], [H, W, D] or [C, H, W, D] '
       'numbers) or a path'),
      (lambda: text.generate_batch(model, tok, ['x <image>'], [[vol]], stacked=[['no']],
                                   max_new_tokens=2),
       "stacked: expected one list per prompt holding one bool per image (image counts [1]), "
       "got [['no']]"),
      (lambda: Tokenizer(cd.spm_proto(), max_images=0),
       'Tokenizer max_images=0: expected a positive integer'),
      # Before: taken, and never acted on (the id is never emitted; the scanned loop multiplies
      # with XLA's products)
      (lambda: text.generate(model, tok, 'x', stop_ids=[99999], max_new_tokens=2),
       "config field generate.stop_ids=[99999]: 99999 is past the model's vocabulary of 512 ids, "
       'which it never emits; expected ids < 512'),
      (lambda: text.generate(model, tok, 'x', sampling=GenerateConfig(
          max_new_tokens=2, layer_loop='scan', cpu_product='panels')),
       "config field generate.cpu_product='panels': the panel kernel serves the unrolled layer "
       "loop; expected generate.layer_loop='unrolled'"),
      # Before: the array's first axis was taken as 20 2D images
      (lambda: text.generate_batch(model, tok, ['x'], [vol], max_new_tokens=2),
       'images[0]: got an array (20, 18, 10); expected a list of scans (one scan: [images[0]])'),
      # Before: only once the earlier prompts were generated, and named 'prompt 0' (from 0 in
      # its batch), not the file's line
      (lambda: text.prompt_token_count(Tokenizer(cd.spm_proto(), max_images=2), 'x', 3, cfg,
                                       name='p.jsonl line 2'),
       'p.jsonl line 2: 3 images; the model and tokenizer take at most 2 (model.max_images)'),
      # Before: each answered, silently, from another image than the one given: PIL's RGB
      # picture read as a 3-slice volume, torch's [C, H, W] as a volume of 3 rows, two slices in
      # a list stacked on the H axis, a masked array's hidden 1e6 voxel scaling the rest to black
      (lambda: text.generate(model, tok, 'x <image>', [rgb], max_new_tokens=2),
       'prompt 0 image 0: a uint8 array (24, 20, 3), an RGB(A) picture as PIL gives it?; expected '
       '[C, H, W, D]: np.moveaxis(image[..., :3], -1, 0)[..., None] for a picture, image[None] '
       'for a volume of 3 slices'),
      (lambda: text.generate(model, tok, 'x <image>', [np.moveaxis(rgb, -1, 0)], max_new_tokens=2),
       'prompt 0 image 0: an array (3, 24, 20), channels first [C, H, W]?; expected [C, H, W, D]'),
      (lambda: text.generate(model, tok, 'x <image>', [[vol[..., 0], vol[..., 1]]],
                             max_new_tokens=2),
       'prompt 0 image 0: a list of 2 arrays; expected one array per scan (slices of a volume: '
       'np.stack(slices, axis=-1) -> [H, W, D])'),
      (lambda: text.generate(model, tok, 'x <image>', [masked], max_new_tokens=2),
       'prompt 0 image 0: a masked array with 1 masked voxels; expected a plain array (fill them '
       'first: image.filled(value))'),
      # Before: the text kept as text, the image put first
      (lambda: text.generate(model, tok, 'a <IMAGE> b', [vol], max_new_tokens=2),
       "prompt 0: prompt holds '<IMAGE>', not an image marker; expected '<image>' (lower case, "
       "no spaces) where an image goes"),
      (lambda: text.generate(model, tok, 'a <image /> b', [vol], max_new_tokens=2),
       "prompt 0: prompt holds '<image />', not an image marker"),
      # Before: any truthy value returned ids; a NumPy number 'expected a finite value >= 0'
      (lambda: text.generate(model, tok, 'x', max_new_tokens=2, return_ids='no'),
       "return_ids: got 'no'; expected True or False"),
      (lambda: text.generate(model, tok, 'x', sampling=GenerateConfig(
          max_new_tokens=2, temperature=np.float32(0.5))),
       'config field generate.temperature=np.float32(0.5): expected a finite value >= 0 (0 means '
       'greedy) (got numpy.float32; expected a Python number: .item())'),
  ]
  rgb = (np.random.default_rng(1).random((24, 20, 3)) * 255).astype(np.uint8)
  masked = np.ma.masked_array(vol.copy(), mask=np.zeros(vol.shape, bool))
  masked.data[0, 0, 0], masked.mask[0, 0, 0] = 1e6, True
  for call, message in cases:
    with pytest.raises(UserError) as e:       # InputError; ConfigError for a config's field
      call()
    assert str(e.value).startswith(message), (message, str(e.value))


def test_numpy_numbers_and_misspelled_options(setup):
  """NumPy numbers for the sampling options are the Python numbers they hold (the same tokens as
  the Python numbers); a misspelled option names generate(), the function called, and the
  option meant."""
  _, model, _, _, tok = setup
  want = text.generate(model, tok, 'x', max_new_tokens=3, top_k=5, stop_ids=[2], return_ids=True)
  got = text.generate(model, tok, 'x', max_new_tokens=np.int64(3), top_k=np.int32(5),
                      stop_ids=[np.int64(2)], return_ids=True)
  assert got[0] == want[0] and list(got[1]) == list(want[1])
  with pytest.raises(TypeError, match="^generate\\(\\) got an unexpected keyword argument "
                     "'temprature' \\(did you mean 'temperature'\\?\\)$"):
    text.generate(model, tok, 'x', temprature=0.5)


def test_load_and_save_refuse_what_they_cannot_take(setup, tmp_path):
  """`load`'s mesh, rules and step, `save`'s path and extra fields: one InputError naming each
  (was: a JAX / Flax traceback; a blamed checkpoint for step=800.0; a folder named '~', the
  working directory written into; the model section or the layout written over, another
  preprocessing recorded as the run's)."""
  import jax
  ckpt = str(setup[0] / 'ckpt')
  model = setup[1]
  other = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  cases = [
      (lambda: api.load(ckpt, mesh='cpu'), 'mesh: got str; expected a jax.sharding.Mesh'),
      (lambda: api.load(ckpt, rules='x'), "rules: got str; expected (logical axis, mesh axis) "
       "pairs, e.g. radfm_jax.sharding.LOGICAL_RULES['fsdp'], or None"),
      (lambda: api.load(ckpt, mesh=other), "rules[1] ('embed', 'fsdp'): mesh axis 'fsdp' is "
       "not one of the mesh's axes ('x',); expected a mesh with axes ('data', 'fsdp', 'tensor')"),
      (lambda: api.load(ckpt, step=800.0), 'step 800.0: expected a training step (an integer '
       '>= 0), or None for the latest'),
      (lambda: api.load(ckpt, step='800'), "step '800': expected a training step"),
      (lambda: api.save(model, ''), "directory: got ''; expected the path of a folder"),
      (lambda: api.save(model, None), 'directory: got None; expected the path of a folder'),
      (lambda: api.save(model, '~/radfm_ckpt'), '~/radfm_ckpt: starts with ~, which a path in '
       "Python does not expand; expected os.path.expanduser('~/radfm_ckpt')"),
      (lambda: api.load('~/radfm_ckpt'), "~/radfm_ckpt: not a checkpoint (no such folder; ~ is "
       "not expanded: os.path.expanduser('~/radfm_ckpt'))"),
      (lambda: api.save(model, str(tmp_path / 's'), generate={'top_k': 5}), "save(generate=...): "
       "'generate' is a section the checkpoint's config.json holds"),
      (lambda: api.save(model, str(tmp_path / 's'), data={'intensity': 'ct_window'}),
       "save(data=...): 'data' is a section"),
      (lambda: api.save(model, str(tmp_path / 's'), layout='train_state'), "save(layout=...)"),
      (lambda: api.save(model, str(tmp_path / 's'), origin=object()), 'save(**info): Object of '
       'type object is not JSON serializable; expected values JSON can hold'),
  ]
  for call, message in cases:
    with pytest.raises(InputError) as e:
      call()
    assert str(e.value).startswith(message), (message, str(e.value))
  assert not (tmp_path / 's').exists() and not os.path.exists('~')
  api.save(model, str(tmp_path / 's'), merged_from='/runs/a', finetune='lora')   # provenance
  assert json.loads((tmp_path / 's' / 'config.json').read_text())['merged_from'] == '/runs/a'


def test_load_and_save_name_a_path_that_is_not_a_checkpoint(setup, tmp_path, capsys):
  """`radfm_jax.load` / `radfm_jax.save` on a path that is not a checkpoint (Was: a bare
  FileNotFoundError / ValueError, or save writing over another folder's config.json): one
  InputError line naming the path and what was expected, the line the commands print too."""
  import radfm_jax
  _, model, _, _, _ = setup
  expected = ('expected a checkpoint folder written by radfm_jax.save, radfm-jax train or '
              'radfm-jax convert')
  layouts = '"layout": one of [\'params\', \'train_state\']'
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'a.txt').write_text('x')
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'config.json').write_text('{"lr": 0.1}')
  for path, message in (
      ('nope', f'nope: not a checkpoint (no such folder); {expected}'),
      ('a.txt', f'a.txt: not a checkpoint (a file); {expected}'),
      ('empty', f'empty: not a checkpoint ({tmp_path}/empty/config.json: not found); '
                f'{expected} (a config.json with {layouts})'),
      ('other', f'other: not a checkpoint ({tmp_path}/other/config.json: no "layout" field, and '
                f'neither params/ nor checkpoints/ beside it); {expected} ({layouts})')):
    with pytest.raises(InputError) as e:
      radfm_jax.load(str(tmp_path / path))
    assert str(e.value) == f'{tmp_path}/{message}'
  assert main(['generate', '--checkpoint', str(tmp_path / 'empty'), '--prompt', 'x']) == 2
  assert capsys.readouterr().err.strip() == (
      f'radfm-jax generate: {tmp_path}/empty: not a checkpoint ({tmp_path}/empty/config.json: not '
      f'found); {expected} (a config.json with {layouts})')
  for path, message in (
      ('a.txt/ckpt', f'a.txt/ckpt: {tmp_path}/a.txt is not a directory; expected a new '
                     'checkpoint folder'),
      ('other', 'other: a folder that is not a parameter-only checkpoint; expected a new '
                'checkpoint folder')):
    with pytest.raises(InputError) as e:
      radfm_jax.save(model, str(tmp_path / path))
    assert str(e.value) == f'{tmp_path}/{message}'
  assert os.listdir(tmp_path / 'other') == ['config.json']          # left as it was
  assert (tmp_path / 'other' / 'config.json').read_text() == '{"lr": 0.1}'


def test_save_refuses_a_training_run_or_a_file(setup, tmp_path):
  """A parameter-only checkpoint saved into a training run's folder wrote a config.json there
  that `load` then read instead of the run; into a file, Orbax's temporary path was named."""
  _, model, _, _, _ = setup
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(InputError, match=f'{tmp_path}/run: holds a training run'):
    api.save(model, str(tmp_path / 'run'))
  (tmp_path / 'a.txt').write_text('x')
  with pytest.raises(InputError, match=f'{tmp_path}/a.txt: a file; expected a folder'):
    api.save(model, str(tmp_path / 'a.txt'))
  assert sorted(os.listdir(tmp_path / 'run')) == ['checkpoints']
  # not a model: one line, nothing written (was 'Found empty item.' and a temporary folder)
  for wrong in (None, {'a': 1}):
    with pytest.raises(InputError, match=f'^model: got {type(wrong).__name__}; expected a RadFM '
                       'model'):
      api.save(wrong, str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()


def test_a_depth_1_case_stack_is_prepared_as_a_volume(tmp_path):
  """generate from raw files: an image of a RadFM case .npy (a path to a 5D stack of one image,
  or one picked by `index` in a prompts file) is min-max scaled over the sample and resized
  nearest, as the original's 3D datasets read a case of depth 1; the same pixels given as an
  array stay a 2D image (bicubic, / 255) unless marked `stacked`."""
  from radfm_jax.infer.prompt_files import read_images
  tok, cfg = cd.tokenizer(), cd.tiny_model()
  case = np.random.default_rng(2).integers(20, 201, (2, 3, 40, 36, 1)).astype(np.uint8)
  np.save(tmp_path / 'one.npy', case[1:])
  np.save(tmp_path / 'case.npy', case)
  lo, hi = float(case[1].min()), float(case[1].max())
  rows, cols = (np.floor(np.arange(64) * n / 64).astype(int) for n in (40, 36))
  want = (case[1][:, rows][:, :, cols][..., [0] * 4].astype(np.float64) - lo) / (hi - lo)
  arrays, _, stacked = read_images([str(tmp_path / 'case.npy')], [None], picks=[{'index': 1}])
  assert stacked == [True]
  for images, marks in (([str(tmp_path / 'one.npy')], None), (arrays, [stacked]),
                        ([case[1]], [[True]])):
    batch = text.prepare_batch(tok, ['What? <image>'], [images], cfg, stacked=marks)
    assert batch['images'].shape == (1, 1, 3, 64, 64, 4)
    np.testing.assert_allclose(batch['images'][0, 0], want, rtol=0, atol=1e-6)
  as_2d = text.prepare_batch(tok, ['What? <image>'], [[case[1]]], cfg)['images'][0, 0]
  assert np.abs(as_2d - want).max() > 0.05
  with pytest.raises(InputError, match='stacked: expected one list per prompt'):
    text.prepare_batch(tok, ['What? <image>'], [[case[1]]], cfg, stacked=[True])
