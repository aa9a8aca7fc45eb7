"""Bad input at the door, second table (found by a probe of the entry points other than the scan
and manifest readers): each row exit code 2 and ONE stderr line, the exact text, before any work;
what was in the way is left as it was. In-process (`cli.main.main(argv)`), no subprocess.

Before: a synthetic text length too short for its image blocks was SyntheticBatches' ValueError
traceback, and one past the model's positions trained; a file or folder of the wrong kind in the
workdir (checkpoints, tensorboard, metrics.jsonl, loss_curve.png) failed at its first write with
a traceback (loss_curve.png after the last step); `convert --llama-heads 0` was a
ZeroDivisionError, --llama-heads 5 on a hidden size of 64 'checkpoint 5', and an override outside
the model section did nothing; `aot --context` / `--max-new` without --generate and --text-len
with it did nothing, a --text-len past the model's positions compiled; `eval` printed the scispaCy
notice before the line of a bad --predictions file (two lines); `demo --config.data.store=...` was
silently replaced by the demo's own store; a folder given for a config file, data.store given a
file, and a folder for a tokenizer were said to be missing ('does not exist', 'no such file',
'manifest a.png/manifest.jsonl: no such file'); `cache-images` took train.* and model.*
overrides and did nothing with them, train with synthetic batches data.tokenizer / data.manifest,
and with a store train.synthetic_length / synthetic_images."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import conftest_data as cd  # noqa: E402
from radfm_jax.cli.main import main  # noqa: E402

pytestmark = pytest.mark.xdist_group('bad_inputs_cli2')

SPEC = 'radfm:model=tiny,mesh=cpu'
SYNTH = ['train', '--config', SPEC, '--workdir', '{root}/run', '--no-progress',
         '--config.data.store=synthetic', '--config.data.batch_size_2d=8', '--max-steps', '0']
CONVERT = ['convert', 'from-torch', '--checkpoint', '{root}/model.safetensors', '--out',
           '{root}/cv', '--config', 'radfm:model=tiny']
AOT = ['aot', '--config', 'radfm:model=tiny,mesh=tpu_v5e_1']
LENGTH = ('expected a synthetic text length in [39, 1024] with data.store=synthetic: BOS, '
          'train.synthetic_images=1 image(s) of 32 tokens and some text, within '
          'model.llama.max_position_embeddings=1024')
WORKDIR = ("radfm-jax train: --workdir {root}/{name}: {root}/{name}/{entry} is a {kind}; expected "
           "the run's {entry} {want} there (or nothing: a new run makes it)")
# (workdir, the run's entry in it, whether the fixture makes it a folder where a file belongs)
WRONG_KIND = (('ckfile', 'checkpoints', False), ('tbfile', 'tensorboard', False),
              ('metdir', 'metrics.jsonl', True), ('lossdir', 'loss_curve.png', True))

# (id, argv with {root}, the one stderr line; a list: argparse's usage error, its last line)
ROWS = [
    ('synthetic-length-short', SYNTH + ['--config.train.synthetic_length=10'],
     f'radfm-jax train: config field train.synthetic_length=10: {LENGTH}'),
    ('synthetic-length-long', SYNTH + ['--config.train.synthetic_length=5000'],
     f'radfm-jax train: config field train.synthetic_length=5000: {LENGTH}'),
    ('synthetic-length-from-text-lengths', SYNTH + ['--config.data.text_lengths=[16]'],
     f'radfm-jax train: config field data.text_lengths=[16]: {LENGTH} '
     '(train.synthetic_length=0: data.text_lengths[0])'),
    ('synthetic-images', SYNTH + ['--config.train.synthetic_images=50'],
     'radfm-jax train: config field train.synthetic_images=50: expected at most 31 with '
     'data.store=synthetic: BOS, the image blocks of 32 tokens each and some text within '
     'model.llama.max_position_embeddings=1024'),
    ('synthetic-with-a-tokenizer', SYNTH + ['--config.data.tokenizer={root}/tok.model'],
     "radfm-jax train: config field data.tokenizer='{root}/tok.model': expected '' with "
     'data.store=synthetic (random batches: they are token ids already, nothing is tokenized)'),
    ('store-with-a-synthetic-length',
     ['train', '--config', SPEC, '--workdir', '{root}/run', '--config.data.store={root}/pngs/store',
      '--config.data.tokenizer={root}/tok.model', '--config.train.synthetic_length=48'],
     "radfm-jax train: config field train.synthetic_length=48: expected the default (0) with "
     "data.store='{root}/pngs/store': only data.store=synthetic reads it"),
    ('store-is-a-file', ['train', '--config', SPEC, '--workdir', '{root}/run',
                         '--config.data.store={root}/a.png',
                         '--config.data.tokenizer={root}/tok.model'],
     'radfm-jax train: config field data.store={root}/a.png: a file; expected the VolumeStore '
     'folder written by `radfm-jax ingest`'),
    ('config-is-a-folder', ['train', '--config', '{root}/folder', '--workdir', '{root}/run'],
     "radfm-jax train: config file '{root}/folder': a folder; expected a path to a "
     'get_config(arg) file, or a built-in experiment: demo, radfm'),
    ('tokenizer-is-a-folder', ['train', '--config', SPEC, '--workdir', '{root}/run',
                               '--config.data.store={root}/pngs/store',
                               '--config.data.tokenizer={root}/folder',
                               '--config.data.batch_size_2d=8', '--config.data.batch_size_3d=8'],
     'radfm-jax train: config field data.tokenizer={root}/folder: a folder; expected a '
     'SentencePiece tokenizer.model: train one with `radfm-jax tokenizer train --manifest '
     "samples.jsonl --out tokenizer.model` or use LLaMA's (docs/data.md)"),
    ('generate-tokenizer-is-a-folder', ['generate', '--checkpoint', '{root}/ckpt', '--tokenizer',
                                        '{root}/folder', '--prompt', 'x'],
     'radfm-jax generate: --tokenizer {root}/folder: a folder; expected the SentencePiece '
     'tokenizer.model file'),
    ('convert-llama-heads-0', CONVERT + ['--llama-heads', '0'],
     ["radfm-jax convert from-torch: error: argument --llama-heads: '0': expected a positive "
      'integer']),
    ('convert-llama-heads-5', CONVERT + ['--llama-heads', '5'],
     "radfm-jax convert: --llama-heads 5: expected a positive integer dividing the checkpoint's "
     'hidden size 64'),
    ('convert-override-outside-model', CONVERT + ['--config.train.steps=3'],
     "radfm-jax convert: override 'train.steps=3': only model.* fields apply here (the other "
     'sections are not read by convert)'),
    ('aot-context-without-generate', AOT + ['--context', '100'],
     "radfm-jax aot: --context 100: goes with --generate; expected --text-len for the train "
     "step's text length"),
    ('aot-max-new-without-generate', AOT + ['--max-new', '10'],
     "radfm-jax aot: --max-new 10: goes with --generate; expected --text-len for the train "
     "step's text length"),
    ('aot-text-len-with-generate', AOT + ['--generate', '--text-len', '100'],
     "radfm-jax aot: --text-len 100: the train step's text length, not compiled with --generate; "
     'expected --context (prompt + new tokens) and --max-new'),
    ('aot-text-len-past-positions', AOT + ['--text-len', '99999'],
     "radfm-jax aot: --text-len 99999: expected a text length <= the model's 1024 positions "
     '(model.llama.max_position_embeddings)'),
    ('cache-images-override-outside-data-mesh',
     ['cache-images', '--checkpoint', '{root}/ckpt', '--data', '{root}/pngs/store', '--config',
      SPEC, "--config.train.freeze=['vision_tower']"],
     "radfm-jax cache-images: override \"train.freeze=['vision_tower']\": only data.* / mesh.* "
     'fields apply here (the model comes from the checkpoint and cache-images trains nothing)'),
    ('eval-predictions-missing', ['eval', '--predictions', '{root}/nope.jsonl', '--out',
                                  '{root}/ev'],        # --entities auto: the notice came first
     'radfm-jax eval: {root}/nope.jsonl: no such predictions file (expected '
     'OUT/predictions.jsonl of `radfm-jax eval`)'),
    ('demo-data-store', ['demo', '--quick', '--no-progress', '--out', '{root}/demo',
                         '--config.data.store=synthetic'],
     "radfm-jax demo: override 'data.store=synthetic': the demo trains on the data it builds "
     '(OUT/store, OUT/tokenizer.model); expected no data.store / data.tokenizer / data.manifest '
     'override (to train on a store of yours: radfm-jax train)'),
]
ROWS += [(f'{entry}-is-a-{"folder" if folder else "file"}',
          SYNTH[:3] + ['--workdir', '{root}/' + name] + SYNTH[5:],
          WORKDIR.format(root='{root}', name=name, entry=entry,
                         kind='folder' if folder else 'file', want='file' if folder else 'folder'))
         for name, entry, folder in WRONG_KIND]


@pytest.fixture(scope='module')
def root(tmp_path_factory, tiny_cfg):
  """A tiny checkpoint and its official safetensors, a tokenizer, a PNG store, a folder, and
  workdirs with one entry of the wrong kind."""
  from safetensors.numpy import save_file

  from convert_fixtures import official_state_dict
  from radfm_jax import api
  from radfm_jax.models.radfm import create_model
  r = tmp_path_factory.mktemp('bad_inputs2')
  api.save(create_model(tiny_cfg, seed=0), str(r / 'ckpt'))
  sd = official_state_dict(tiny_cfg, seed=5, keep_dead=False)
  save_file({k: v.numpy() for k, v in sd.items() if k != 'embedding_layer.weight'},
            str(r / 'model.safetensors'))
  (r / 'tok.model').write_bytes(cd.spm_proto())
  cd.write_png(r / 'a.png', (np.random.default_rng(0).random((24, 20)) * 255).astype(np.uint8))
  (r / 'pngs').mkdir()
  cd.png_store(r / 'pngs')
  (r / 'folder').mkdir()
  for name, entry, folder in WRONG_KIND:
    (r / name).mkdir()
    if folder:
      (r / name / entry).mkdir()
    else:
      (r / name / entry).write_text('mine')
  return r


def _snapshot(root) -> dict:
  return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
          for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize('row_id, argv, expected', ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(root, capsys, row_id, argv, expected):
  before = _snapshot(root)
  argv = [a.format(root=root) for a in argv]
  try:
    rc = main(argv)
  except SystemExit as e:                             # argparse: usage line(s) + error line
    rc = e.code
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2, err
  if isinstance(expected, list):
    assert err[-1] == expected[0].format(root=root), err
  else:
    assert err == [expected.format(root=root)], err
  for made in ('run', 'cv', 'ev'):                    # nothing written, nothing changed
    assert not (root / made).exists(), made
  assert not (root / 'demo').exists() or not os.listdir(root / 'demo')
  assert _snapshot(root) == before
