"""Bad input at the door: a table of bad flags, config values and input files for `radfm-jax`,
each with its outcome — exit code 2 and ONE stderr line `radfm-jax CMD: ...` naming the exact
field / file / line (and the limit or what was expected) — checked before any model is built or
anything is generated. Most rows run in-process (`cli.main.main(argv)`), a few as real
subprocesses. Then the correct results next to them: batch sizes the mesh takes, `eval --split`,
unreadable scans skipped and counted by `eval`."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import conftest_data as cd  # noqa: E402
from radfm_jax.cli.main import main  # noqa: E402
from radfm_jax.config import ConfigError, check_batch_axes, load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.xdist_group('bad_inputs_cli')

SPEC = 'radfm:model=tiny,mesh=cpu'
TRAIN = ['train', '--config', SPEC, '--workdir', '{root}/run', '--no-progress']
GEN = ['generate', '--checkpoint', '{root}/ckpt', '--tokenizer', '{root}/tok.model',
       '--no-progress']
EVAL = ['eval', '--checkpoint', '{root}/ckpt', '--tokenizer', '{root}/tok.model',
        '--out', '{root}/eval_out', '--entities', 'none', '--no-progress']
LONG = 'nodule ' * 1100            # > the 1024 positions of `tiny` in any tokenization
MEDIUM = 'nodule ' * 900           # fits alone; not with the default 200 new tokens


def _config(field: str, value: str):
  """A config row: `train --config.FIELD=VALUE` -> exit 2 naming `config field FIELD=`."""
  return (f'config:{field}={value}', TRAIN + [f'--config.{field}={value}'],
          [f'radfm-jax train: config field {field}='])


# (id, argv with {root} for the fixture folder, substrings the one stderr line must hold)
ROWS = [
    # --- config: empty lists, negative counts, non-finite / non-positive floats, ranges, types
    _config('data.text_lengths', '[]'),
    _config('data.text_lengths', '[512, 256]'),
    _config('data.text_lengths', '[4096]'),
    _config('data.depth_buckets', '[]'),
    _config('data.num_workers', '-1'),
    _config('data.batch_size_2d', '0'),
    _config('data.max_images', '0'),
    _config('data.shuffle', '1'),
    _config('data.ct_windows', '[[40, 0]]'),
    _config('data.ct_windows', '[]'),
    _config('data.percentiles', '[99.5, 0.5]'),
    _config('data.ct_windows', '[40, 400]'),           # was: TypeError's traceback
    _config('mesh.ici', '[1, 2]'),                      # was: TypeError's traceback
    _config('mesh.ici', 'data'),                        # was: ValueError's traceback
    _config('train.learning_rate', '0'),
    _config('train.learning_rate', '-1e-4'),
    _config('train.learning_rate', '1e999'),          # inf
    _config('train.eps', '0'),
    _config('train.b1', '1.0'),
    _config('train.weight_decay', '-0.1'),
    _config('train.max_grad_norm', '1e999'),
    _config('train.grad_accum', '0'),
    _config('train.eval_every', '-1'),
    _config('model.llama.rope_theta', '0'),
    _config('model.llama.rms_norm_eps', '-1e-6'),
    _config('model.vision.dropout', '1.0'),
    _config('mesh.hbm_gib', '-1'),
    _config('seed', '-1'),
    _config('seed', '4294967296'),                    # was: the run of seed 0 (a 32-bit key)
    _config('generate.max_new_tokens', '0'),
    _config('generate.max_new_tokens', '-5'),
    _config('generate.temperature', '-1'),
    _config('generate.temperature', '1e999'),
    _config('generate.top_p', '0'),
    _config('generate.top_p', '1.5'),
    _config('generate.top_k', '-1'),
    _config('generate.stop_ids', '[-1]'),
    _config('generate.cache_chunk', '-1'),
    _config('finetune.method', 'dora'),
    _config('finetune.rank', '0'),
    _config('finetune.alpha', '1e999'),               # inf
    _config('finetune.dropout', '1.0'),
    _config('finetune.quant', 'int3'),
    _config('finetune.targets', "['llama/(q']"),
    _config('train.lr_multipliers', "[['vision/.*', 1e999]]"),
    _config('train.lr_multipliers', "[['vision/(', 2.0]]"),
    ('config:arg-finetune', ['train', '--config', 'radfm:model=tiny,finetune=dora', '--workdir',
                             '{root}/run'],
     ["radfm-jax train: --config radfm:model=tiny,finetune=dora: config arg finetune='dora': "
      "expected one of ['full', 'lora', 'qlora']"]),
    ('config:arg-model', ['train', '--config', 'radfm:model=tinyy', '--workdir', '{root}/run'],
     ["config arg model='tinyy': expected one of ['bench', 'radfm_13b', 'radfm_1b', 'small', "
      "'tiny']"]),
    ('config:unknown-field', TRAIN + ['--config.data.batch_size=4'],
     ['no config field data.batch_size']),
    # --- the global batch against the mesh (8 devices: fsdp=8), before the model is built
    ('batch:2d-not-divisible', TRAIN + ['--config.data.store=synthetic',
                                        '--config.data.batch_size_2d=3'],
     ['config field data.batch_size_2d=3: expected a multiple of 8', 'data x fsdp = 8',
      'mesh data=1, fsdp=8, tensor=1 on 8 devices']),
    ('batch:grad-accum', TRAIN + ['--config.data.store=synthetic', '--config.data.batch_size_2d=8',
                                  '--config.train.grad_accum=2'],
     ['config field data.batch_size_2d=8: expected a multiple of 16', 'train.grad_accum=2']),
    ('train:no-store-folder', TRAIN + ['--config.data.batch_size_2d=8',
                                       '--config.data.store={root}/store',
                                       '--config.data.tokenizer={root}/tok.model'],
     ['manifest {root}/store/manifest.jsonl: no such file']),
    ('train:workdir-is-a-file', ['train', '--config', SPEC, '--workdir', '{root}/a.png',
                                 '--config.data.store=synthetic'],
     ["radfm-jax train: --workdir {root}/a.png: exists and is not a folder; expected the run's "
      'folder (new, or one to resume)']),
    ('train:workdir-below-a-file', ['train', '--config', SPEC, '--workdir', '{root}/a.png/run',
                                    '--config.data.store=synthetic'],
     ['radfm-jax train: --workdir {root}/a.png/run: {root}/a.png is not a directory']),
    ('train:max-steps', TRAIN + ['--max-steps', '-3'],
     ["argument --max-steps: '-3': expected an integer >= 0"]),
    ('train:config-syntax', ['train', '--config', '{root}/syntax.py', '--workdir', '{root}/run'],
     ["radfm-jax train: config file {root}/syntax.py line 2: SyntaxError: '{{' was never closed"]),
    ('train:config-raises', ['train', '--config', '{root}/raises.py', '--workdir', '{root}/run'],
     ["radfm-jax train: config file {root}/raises.py line 3: KeyError: 'trian'"]),
    ('train:workdir-param-only', ['train', '--config', SPEC, '--workdir', '{root}/ckpt',
                                  '--config.data.store=synthetic'],
     ['radfm-jax train: --workdir {root}/ckpt: holds a parameter-only checkpoint '
      '({root}/ckpt/config.json); expected a new folder or a run to resume']),
    ('train:config-not-python', ['train', '--config', '{root}/tok.model', '--workdir',
                                 '{root}/run'],
     ['radfm-jax train: config file {root}/tok.model: not a Python file']),
    ('aot:kinds', ['aot', '--config', 'radfm:model=tiny,mesh=tpu_v5e_1', '--kinds', 'foo'],
     ['radfm-jax aot: --kinds foo: expected a comma list of 2d, 3d, each once']),
    ('aot:batch', ['aot', '--config', 'radfm:model=tiny,mesh=tpu_v5e_1', '--batch-2d', '0'],
     ["argument --batch-2d: '0': expected a positive integer"]),
    ('aot:context', ['aot', '--config', 'radfm:model=tiny,mesh=tpu_v5e_1', '--generate',
                     '--context', '2048'],
     ["radfm-jax aot: --context 2048 --max-new 256: expected max-new < context <= the model's "
      '1024 positions']),
    ('aot:topology', ['aot', '--config', 'radfm:model=tiny,mesh=tpu_v5e_1',
                      '--config.mesh.topology=bogus'],
     ["radfm-jax aot: config field mesh.topology='bogus': expected a TPU topology name"]),
    ('publish:out-is-a-file', ['publish', '--data', '{root}/pngs/store', '--out', '{root}/a.png'],
     ['radfm-jax publish: --out {root}/a.png: exists and is not a folder']),
    ('train:section-typo', ['train', '--config', '{root}/typo.py', '--workdir', '{root}/run'],
     ['radfm-jax train: config section trian: unknown (did you mean train?)']),
    ('train:manifest-folder', TRAIN + ['--config.data.store={root}/pngs/store',
                                       '--config.data.tokenizer={root}/tok.model',
                                       '--config.data.manifest={root}/empty'],
     ['radfm-jax train: {root}/empty: not a TFDS dataset directory (no dataset_info.json)']),
    ('train:eval-every-without-eval-split', TRAIN + ['--config.data.store={root}/pngs/store',
                                                     '--config.data.tokenizer={root}/tok.model',
                                                     '--config.data.batch_size_2d=8',
                                                     '--config.train.eval_every=2'],
     # was: said at the first eval, eval_every steps into the run
     ["radfm-jax train: config field train.eval_every=2 asks for a periodic eval, but "
      "{root}/pngs/store/manifest.jsonl has no samples in split 'eval' (splits here: "
      "{{'train': 4}}); expected"]),
    ('train:store-without-index', TRAIN + ['--config.data.store={root}/no_index',
                                           '--config.data.tokenizer={root}/tok.model'],
     ['radfm-jax train: {root}/no_index/scans.jsonl: missing; expected the scan index']),
    ('cache-images:data-is-a-file', ['cache-images', '--checkpoint', '{root}/ckpt', '--data',
                                     '{root}/a.png', '--config', SPEC],   # was: a.png/manifest.jsonl
     ['radfm-jax cache-images: --data {root}/a.png: a file; expected the volume store folder '
      '`radfm-jax ingest` wrote']),
    ('cache-images:no-such-step', ['cache-images', '--checkpoint', '{root}/ckpt', '--data',
                                   '{root}/pngs/store', '--config', SPEC, '--step', '3'],
     ['radfm-jax cache-images: --checkpoint {root}/ckpt: {root}/ckpt/config.json: a '
      'parameter-only checkpoint (layout "params") has no step 3']),
    # --- generate: the same config validation, flags, files, lines, limits
    ('generate:max-new-tokens', GEN + ['--prompt', 'x', '--config.generate.max_new_tokens=0'],
     ['radfm-jax generate: config field generate.max_new_tokens=0: expected a positive integer']),
    ('generate:temperature', GEN + ['--prompt', 'x', '--config.generate.temperature=-1.0'],
     ['config field generate.temperature=-1.0']),
    ('generate:top-p', GEN + ['--prompt', 'x', '--config.generate.top_p=0'],
     ['config field generate.top_p=0']),
    ('generate:missing-checkpoint', ['generate', '--checkpoint', '{root}/nope', '--prompt', 'x'],
     ['--checkpoint {root}/nope: no such checkpoint directory']),
    ('generate:no-tokenizer', ['generate', '--checkpoint', '{root}/ckpt', '--prompt', 'x'],
     ['{root}/ckpt: no tokenizer found', '--tokenizer PATH']),
    ('generate:missing-tokenizer', ['generate', '--checkpoint', '{root}/ckpt', '--tokenizer',
                                    '{root}/nope.model', '--prompt', 'x'],
     ['--tokenizer {root}/nope.model: no such file']),
    ('generate:missing-image', GEN + ['--prompt', '<image>', '--image', '{root}/nope.nii.gz'],
     ['--image #1: image file not found: {root}/nope.nii.gz']),
    ('generate:unreadable-image', GEN + ['--prompt', '<image>', '--image', '{root}/junk.nii.gz'],
     ['--image #1: cannot read image {root}/junk.nii.gz']),
    ('generate:no-prompts-file', GEN + ['--input', '{root}/nope.jsonl'],
     ['prompts file {root}/nope.jsonl: no such file']),
    ('generate:prompts-file-is-a-folder', GEN + ['--input', '{root}'],
     ['prompts file {root}: a folder (expected JSONL']),
    ('generate:bad-json-line', GEN + ['--input', '{root}/bad_json.jsonl'],
     ['{root}/bad_json.jsonl line 3: not valid JSON']),
    ('generate:not-an-object', GEN + ['--input', '{root}/list.jsonl'],
     ['{root}/list.jsonl line 1: got a JSON array; expected one JSON object per line']),
    ('generate:no-prompt-field', GEN + ['--input', '{root}/no_prompt.jsonl'],
     ['{root}/no_prompt.jsonl line 2 field prompt: expected a string, got None']),
    ('generate:images-not-list', GEN + ['--input', '{root}/images_str.jsonl'],
     ["{root}/images_str.jsonl line 1 field images: expected a list, got 'a.png'"]),
    ('generate:image-without-path', GEN + ['--input', '{root}/image_dict.jsonl'],
     ['{root}/image_dict.jsonl line 1 field images[1].path: expected a file path']),
    ('generate:missing-image-line', GEN + ['--input', '{root}/missing_img.jsonl'],
     ['{root}/missing_img.jsonl line 2 field images[0]: image file not found: '
      '{root}/missing.nii.gz']),
    ('generate:empty-prompts-file', GEN + ['--input', '{root}/empty.jsonl'],
     ['prompts file {root}/empty.jsonl: no prompts (no JSON line in the file)']),
    ('generate:field-typo', GEN + ['--input', '{root}/typo.jsonl'],
     ['{root}/typo.jsonl line 2 field image: unknown field (did you mean images?); expected id, '
      'prompt, images']),
    ('generate:marker-count', GEN + ['--input', '{root}/markers.jsonl'],
     ['{root}/markers.jsonl line 1: prompt has 2 <image> markers but 1 images were given']),
    ('generate:prompt-too-long-line', GEN + ['--input', '{root}/long.jsonl'],
     ['{root}/long.jsonl line 2: prompt of {long} tokens', 'exceeds the model\'s 1024 positions '
      '(model.llama.max_position_embeddings)']),
    ('generate:prompt-plus-new-tokens', GEN + ['--prompt', MEDIUM],
     ['--prompt: prompt of {medium} tokens (image blocks included) + '
      'generate.max_new_tokens=200 exceeds the model\'s 1024 positions']),
    ('generate:intensity', GEN + ['--prompt', 'x', '--intensity', 'hu'],
     ["argument --intensity: invalid choice: 'hu'"]),
    ('generate:no-such-step', GEN + ['--prompt', 'x', '--step', '7'],
     ['radfm-jax generate: --checkpoint {root}/ckpt: ', 'has no step 7']),
    ('generate:wrong-tokenizer', ['generate', '--checkpoint', '{root}/ckpt', '--tokenizer',
                                  '{root}/tok300.model', '--prompt', 'x'],
     ['tokenizer has 300 SentencePiece pieces but the model vocabulary is 512']),
    ('generate:input-and-image', GEN + ['--input', '{root}/markers.jsonl', '--image',
                                       '{root}/a.png'],
     ['radfm-jax generate: --image goes with --prompt; with --input each line names its own']),
    ('generate:seed', GEN + ['--prompt', 'x', '--seed', '4294967296'],
     ["argument --seed: '4294967296': expected an integer in [0, 2^32)"]),
    ('generate:seed-greedy', GEN + ['--prompt', 'x', '--seed', '7'],      # was taken, unused
     ['radfm-jax generate: --seed 7: generate.temperature=0 decodes greedily and draws nothing; '
      'expected --config.generate.temperature > 0 with it, or no --seed']),
    ('generate:id-null', GEN + ['--input', '{root}/id_null.jsonl'],
     ['{root}/id_null.jsonl line 1 field id: got null; expected a string or an integer']),
    ('generate:id-twice', GEN + ['--input', '{root}/id_twice.jsonl'],
     ['{root}/id_twice.jsonl line 2 field id: "q" is already used ({root}/id_twice.jsonl line '
      '1); expected a unique id']),
    ('generate:output-is-the-image', GEN + ['--prompt', '<image>', '--image', '{root}/a.png',
                                            '--output', '{root}/a.png'],    # was: a.png replaced
     ['--output {root}/a.png: is --image #1 ({root}/a.png), which the answers would replace; '
      'expected a file path for the answers (JSONL) that is not one of the inputs']),
    ('generate:output-is-the-input', GEN + ['--input', '{root}/markers.jsonl', '--output',
                                            '{root}/markers.jsonl'],
     ['--output {root}/markers.jsonl: is the --input prompts file ({root}/markers.jsonl)']),
    ('generate:output-in-the-checkpoint', GEN + ['--prompt', 'x', '--output',
                                                 '{root}/ckpt/config.json'],
     ['--output {root}/ckpt/config.json: is a file of --checkpoint {root}/ckpt']),
    ('generate:output-is-the-tokenizer', GEN + ['--prompt', 'x', '--output', '{root}/tok.model'],
     ['--output {root}/tok.model: is the --tokenizer ({root}/tok.model)']),
    ('generate:output-ends-in-a-slash', GEN + ['--prompt', 'x', '--output', '{root}/answers/'],
     ['--output {root}/answers/: is a folder; expected a file path']),   # was: a traceback
    ('generate:batch-size', GEN + ['--prompt', 'x', '--batch-size', '0'],
     ['radfm-jax generate: --batch-size 0: expected >= 1']),
    # --- eval
    ('eval:limit', EVAL + ['--data', '{root}/samples.jsonl', '--limit', '-1'],
     ['radfm-jax eval: --limit -1: expected a number of samples >= 1']),
    ('eval:missing-data', EVAL + ['--data', '{root}/nope.jsonl'],
     ['{root}/nope.jsonl: no such store directory or manifest file']),
    ('eval:no-such-split', EVAL + ['--data', '{root}/samples.jsonl', '--split', 'test'],
     ["{root}/samples.jsonl: no samples in split 'test' (splits here: {{'eval': 1, 'train': 2}})"]),
    ('eval:top-k', EVAL + ['--data', '{root}/samples.jsonl', '--config.generate.top_k=-2'],
     ['radfm-jax eval: config field generate.top_k=-2']),
    ('generate:config-not-json', ['generate', '--checkpoint', '{root}/cut', '--prompt', 'x'],
     ['radfm-jax generate: {root}/cut/config.json: not valid JSON (', 'expected the run record']),
    # --- writing into a checkpoint, over its own input, over another command's output
    ('merge:out-inside-a-run', ['merge', '--checkpoint', '{root}/ckpt', '--out',
                                '{root}/trun/checkpoints/7'],   # was: the run's next resume
     ['radfm-jax merge: --out {root}/trun/checkpoints/7: inside the checkpoint '  # moved it aside
      '{root}/trun/checkpoints; expected a new checkpoint folder outside any other checkpoint']),
    ('convert:to-torch-into-its-tree', ['convert', 'to-torch', '--checkpoint', '{root}/ckpt',
                                        '--out', '{root}/ckpt/params/model.safetensors'],
     ['radfm-jax convert: --out {root}/ckpt/params/model.safetensors: inside the checkpoint '
      '{root}/ckpt; expected a file outside any checkpoint folder']),
    ('convert:out-holds-the-input', ['convert', 'from-torch', '--checkpoint',  # was: deleted it
                                     '{root}/cvt/params/model.safetensors', '--out', '{root}/cvt',
                                     '--overwrite', '--config', 'configs/radfm.py:model=tiny'],
     ['radfm-jax convert: --checkpoint {root}/cvt/params/model.safetensors: inside --out '
      '{root}/cvt, which convert replaces; expected --out another folder']),
    ('tokenizer:empty-manifest', ['tokenizer', 'train', '--manifest', '{root}/nothing.jsonl',
                                  '--out', '{root}/t/x.model'],   # was: templates alone, exit 0
     ['radfm-jax tokenizer: --manifest {root}/nothing.jsonl: no samples (no JSON line in the '
      'file); expected a JSONL manifest']),
    ('eval:out-holds-a-finished-eval', EVAL + ['--data', '{root}/samples.jsonl', '--out',
                                               '{root}/done'],    # was: replaced, unasked
     ['radfm-jax eval: --out {root}/done: holds the predictions.jsonl and summary.json of a '
      'finished eval; expected a new folder, or --overwrite to replace them']),
    ('eval:out-is-a-checkpoint', EVAL + ['--data', '{root}/samples.jsonl', '--out', '{root}/ckpt'],
     ['radfm-jax eval: --out {root}/ckpt: inside the checkpoint {root}/ckpt; expected a folder']),
    ('eval:rescore-over-another-summary', ['eval', '--predictions',
                                           '{root}/demo_like/predictions.jsonl', '--out',
                                           '{root}/demo_like', '--entities', 'none'],
     ["radfm-jax eval: --out {root}/demo_like: holds a summary.json that is not an eval's (no "
      '"metric_notes": another command\'s, e.g. the demo\'s), which eval would replace']),
    # --- merge
    ('merge:empty-folder', ['merge', '--checkpoint', '{root}/empty', '--out', '{root}/m'],
     ['radfm-jax merge: {root}/empty: not a checkpoint ({root}/empty/config.json: not found']),
    ('merge:missing-checkpoint', ['merge', '--checkpoint', '{root}/nope', '--out', '{root}/m'],
     ['radfm-jax merge: --checkpoint {root}/nope: no such checkpoint directory']),
    ('merge:not-a-lora-run', ['merge', '--checkpoint', '{root}/ckpt', '--out', '{root}/m'],
     ['radfm-jax merge: {root}/ckpt: finetune.method is full (no adapters to merge)']),
    # --- cache-images
    ('cache-images:missing-checkpoint', ['cache-images', '--checkpoint', '{root}/nope', '--data',
                                         '{root}/store'],
     ['radfm-jax cache-images: {root}/nope: not a checkpoint (no such folder); expected a '
      'checkpoint folder written by radfm_jax.save, radfm-jax train or radfm-jax convert']),
    # --- convert
    ('convert:missing-checkpoint', ['convert', 'to-torch', '--checkpoint', '{root}/nope',
                                    '--out', '{root}/t/model.bin'],
     ['radfm-jax convert: --checkpoint {root}/nope: no such file or directory']),
    ('convert:out-suffix', ['convert', 'to-torch', '--checkpoint', '{root}/ckpt', '--out',
                            '{root}/t/model.safetensor'],
     ['radfm-jax convert: --out {root}/t/model.safetensor: expected a file name ending in '
      '.safetensors']),
    ('convert:missing-hf', ['convert', 'from-hf-llama', '--hf', '{root}/nope', '--out',
                            '{root}/hf_out'],
     ['--hf {root}/nope: no such file or directory']),
]
SUBPROCESS = {'config:data.text_lengths=[]', 'batch:2d-not-divisible', 'generate:bad-json-line',
              'generate:prompt-too-long-line'}


def _jsonl(path, lines):
  path.write_text(''.join((line if isinstance(line, str) else json.dumps(line)) + '\n'
                          for line in lines))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """A tiny random checkpoint, its tokenizer, a PNG, a junk NIfTI and the bad prompt files."""
  from radfm_jax import api
  from radfm_jax.models.radfm import create_model
  r = tmp_path_factory.mktemp('bad_inputs')
  api.save(create_model(cd.tiny_model(), seed=0), str(r / 'ckpt'))
  (r / 'tok.model').write_bytes(cd.spm_proto())
  (r / 'tok300.model').write_bytes(cd.spm_proto(300))
  cd.write_png(r / 'a.png', (np.random.default_rng(0).random((24, 20)) * 255).astype(np.uint8))
  (r / 'junk.nii.gz').write_bytes(b'not a nifti at all')
  ok = {'id': 'q1', 'prompt': 'Is there a nodule?'}
  _jsonl(r / 'bad_json.jsonl', [ok, '', '{"prompt": "x", '])     # line 2 blank, line 3 cut
  _jsonl(r / 'list.jsonl', ['["prompt"]'])
  _jsonl(r / 'no_prompt.jsonl', [ok, {'id': 'q2', 'images': []}])
  _jsonl(r / 'images_str.jsonl', [{'prompt': 'x', 'images': 'a.png'}])
  _jsonl(r / 'image_dict.jsonl', [{'prompt': 'x', 'images': ['a.png', {'modality': 'CT'}]}])
  _jsonl(r / 'missing_img.jsonl', [ok, {'prompt': '<image>', 'images': ['missing.nii.gz']}])
  _jsonl(r / 'markers.jsonl', [{'prompt': '<image> vs <image>', 'images': ['a.png']}])
  _jsonl(r / 'typo.jsonl', [ok, {'prompt': '<image>', 'image': ['a.png'], 'note': 'mine'}])
  _jsonl(r / 'empty.jsonl', ['', ''])
  _jsonl(r / 'long.jsonl', [ok, {'prompt': LONG}])
  records = [{'id': f's{i}', 'question': 'Is there a nodule?', 'answer': 'No', 'split': split,
              'images': [{'path': 'a.png'}]}
             for i, split in enumerate(['train', 'eval', 'train'])]
  cd.write_manifest(r / 'samples.jsonl', records)
  (r / 'empty').mkdir()
  (r / 'pngs').mkdir()
  cd.png_store(r / 'pngs')
  shutil.copytree(r / 'pngs' / 'store', r / 'no_index')
  os.remove(r / 'no_index' / 'scans.jsonl')
  (r / 'typo.py').write_text('def get_config(arg):\n  return {"trian": {"steps": 2}}\n')
  _jsonl(r / 'id_null.jsonl', [{'id': None, 'prompt': 'x'}])
  _jsonl(r / 'id_twice.jsonl', [{'id': 'q', 'prompt': 'x'}, {'id': 'q', 'prompt': 'y'}])
  (r / 'syntax.py').write_text('def get_config(arg):\n  return {\n')
  (r / 'raises.py').write_text('def get_config(arg):\n  sections = {"train": {}}\n'
                               '  return sections["trian"]\n')
  from radfm_jax.checkpoint import meta
  (r / 'trun' / 'checkpoints').mkdir(parents=True)     # a training run's record
  (r / 'trun' / 'checkpoints' / 'config.json').write_text(json.dumps(
      meta.layout_record(meta.TRAIN_STATE)))
  shutil.copytree(r / 'ckpt', r / 'cvt')               # a checkpoint --overwrite may replace,
  (r / 'cvt' / 'params' / 'model.safetensors').write_bytes(b'refused before read')  # holding it
  (r / 'nothing.jsonl').write_text('')
  row = {'id': 'q', 'question': 'q', 'reference': 'yes', 'prediction': 'no', 'kind': 'closed',
         'task': 'vqa', 'dataset': 'default'}
  for name, summary in (('done', {'n_samples': 1, 'metric_notes': {}}),
                        ('demo_like', {'model': 'small', 'steps': 800})):
    (r / name).mkdir()
    _jsonl(r / name / 'predictions.jsonl', [row])
    (r / name / 'summary.json').write_text(json.dumps(summary))
  shutil.copytree(r / 'ckpt', r / 'cut')                # its config.json cut short
  (r / 'cut' / 'config.json').write_bytes((r / 'ckpt' / 'config.json').read_bytes()[:40])
  return r


def _expand(text: str, root) -> str:
  tok = cd.tokenizer()
  return text.format(root=root, long=len(tok.encode(LONG)), medium=len(tok.encode(MEDIUM)))


def _check(rc: int, err: str, expected, root):
  lines = err.strip().splitlines()
  assert rc == 2, err
  if not expected[0].startswith('argument '):           # argparse: usage line + error line
    assert len(lines) == 1, err
    assert lines[0].startswith('radfm-jax '), err
  for want in expected:
    assert _expand(want, root) in err, (want, err)


@pytest.mark.parametrize('row_id, argv, expected', ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(root, capsys, row_id, argv, expected):
  argv = [_expand(a, root) for a in argv]
  if row_id in SUBPROCESS:
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get('PYTHONPATH', ''),
               JAX_PLATFORMS='cpu', XLA_FLAGS=cd.xla_flags(8))
    proc = subprocess.run([sys.executable, '-m', 'radfm_jax.cli', *argv], capture_output=True,
                          text=True, env=env, timeout=300)
    rc, err = proc.returncode, proc.stderr
    assert proc.stdout == ''
  else:
    try:
      rc = main(argv)
    except SystemExit as e:                             # argparse errors
      rc = e.code
    err = capsys.readouterr().err
  _check(rc, err, expected, root)
  assert not (root / 'run').exists() and not (root / 'eval_out').exists()   # nothing written
  assert not (root / 't').exists()


def test_batch_check_is_before_the_model(root):
  """The indivisible batch fails before the training loop (and so the model) is even imported,
  not at the first compile 30-40 s in: checked in a fresh interpreter by what it imported."""
  argv = [_expand(a, root) for a in TRAIN] + ['--config.data.store=synthetic',
                                               '--config.data.batch_size_2d=3']
  code = ('import sys; from radfm_jax.cli.main import main; rc = main(%r); '
          'print(rc, "radfm_jax.train.loop" in sys.modules, "radfm_jax.models.radfm" in sys.modules)'
          % (argv,))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=cd.xla_flags(8),
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.stdout.split() == ['2', 'False', 'False'], proc.stderr[-2000:]
  assert 'config field data.batch_size_2d=3' in proc.stderr


def test_batch_sizes_the_mesh_takes():
  """Correct results: sizes that divide over the batch axes pass; processes multiply the batch."""
  cfg = load_config(SPEC, ['data.batch_size_2d=8', 'data.batch_size_3d=8'])
  assert check_batch_axes(cfg, 8) is None
  assert check_batch_axes(cfg, 4) is None and check_batch_axes(cfg, 1) is None
  # 8 devices in 8 processes: one row per process is a global batch of 8.
  one = load_config(SPEC, ['data.batch_size_2d=1', 'data.batch_size_3d=1'])
  assert check_batch_axes(one, 8, num_processes=8) is None
  with pytest.raises(ConfigError, match=r'data.batch_size_2d=1: expected a multiple of 2'):
    check_batch_axes(one, 8, num_processes=4)
  # tensor axis does not split the batch: data=2 x fsdp=2 x tensor=2 needs multiples of 4.
  tp = load_config(SPEC, ["mesh.ici=[['data', 2], ['fsdp', 2], ['tensor', 2]]",
                          'data.batch_size_2d=4', 'data.batch_size_3d=4'])
  assert check_batch_axes(tp, 8) is None
  # only the kinds asked for (the synthetic source batches 2D only)
  assert check_batch_axes(load_config(SPEC, ['data.batch_size_2d=8']), 8, kinds=('2d',)) is None


def test_eval_split_and_unreadable_scans(root, tmp_path, capsys):
  """`eval --split train` scores only the two 'train' rows; the one whose scan is junk is
  skipped, counted in summary.json and on stderr, and the other is scored."""
  records = [{'id': 'good', 'question': 'Is there a nodule?', 'answer': 'No', 'split': 'train',
              'images': [{'path': str(root / 'a.png')}]},
             {'id': 'bad', 'question': 'Is there a nodule?', 'answer': 'Yes', 'split': 'train',
              'images': [{'path': str(root / 'junk.nii.gz')}]},
             {'id': 'gone', 'question': 'Any fluid?', 'answer': 'No', 'split': 'eval',
              'images': [{'path': str(root / 'nope.png')}]}]
  cd.write_manifest(tmp_path / 'samples.jsonl', records)
  out = tmp_path / 'out'
  rc = main(['eval', '--checkpoint', str(root / 'ckpt'), '--tokenizer', str(root / 'tok.model'),
             '--data', str(tmp_path / 'samples.jsonl'), '--split', 'train', '--out', str(out),
             '--entities', 'none', '--no-progress', '--config.generate.max_new_tokens=2'])
  err = capsys.readouterr().err
  assert rc == 0, err
  rows = [json.loads(line) for line in open(out / 'predictions.jsonl')]
  assert [r['id'] for r in rows] == ['good']
  summary = json.load(open(out / 'summary.json'))
  assert summary['split'] == 'train' and summary['n_samples'] == 1 and summary['skipped'] == 1
  [skip] = summary['skipped_samples']
  assert skip['sample_id'] == 'bad' and skip['scan_id'] == str(root / 'junk.nii.gz')
  assert skip['reason'] == (f'RejectedScan: {root / "junk.nii.gz"}: not a readable NIfTI: '
                            f'ImageFileError: File '
                            f'{root / "junk.nii.gz"} is not a gzip file')
  assert f'skipped 1 of 2 samples with an unreadable scan (listed in {out}/summary.json)' in err
  assert json.loads(err.strip().splitlines()[-1])['skipped'] == 1
  # Every sample of a split unreadable: the summary is written and the exit code is 1.
  rc = main(['eval', '--checkpoint', str(root / 'ckpt'), '--tokenizer', str(root / 'tok.model'),
             '--data', str(tmp_path / 'samples.jsonl'), '--split', 'eval', '--out',
             str(tmp_path / 'out2'), '--entities', 'none', '--no-progress'])
  assert rc == 1
  summary = json.load(open(tmp_path / 'out2' / 'summary.json'))
  assert summary['skipped'] == 1 and summary['skipped_samples'][0]['sample_id'] == 'gone'
  assert 'file not found' in summary['skipped_samples'][0]['reason']
  assert 'skipped 1 of 1 samples' in capsys.readouterr().err


@pytest.mark.parametrize('kwargs, field', [
    ({'max_new_tokens': 0}, 'generate.max_new_tokens=0: expected a positive integer'),
    ({'temperature': float('nan')}, 'generate.temperature=nan: expected a finite value >= 0'),
    ({'top_p': 0.0}, r'generate.top_p=0.0: expected a value in \(0, 1\]'),
    ({'top_k': -1}, 'generate.top_k=-1: expected an integer >= 0'),
    ({'stop_ids': 2}, r'generate.stop_ids=2: expected a list of token ids \(integers >= 0\)'),
])
def test_python_sampling_arguments_are_validated(kwargs, field):
  """`generate_batch`'s keyword overrides get the config's checks before the model is touched
  (model=None: nothing of it is used)."""
  from radfm_jax.infer import text
  with pytest.raises(ConfigError, match=field):
    text.generate_batch(None, cd.tokenizer(), ['Is there a nodule?'], **kwargs)


def test_load_for_generation_checks_its_intensity_first(tmp_path):
  """An intensity policy that does not exist is an InputError naming it before the checkpoint is
  read (it was kept, and the first image failed with a bare ValueError)."""
  from radfm_jax import api
  from radfm_jax.errors import InputError
  with pytest.raises(InputError, match=r"^intensity 'ct': expected one of \('radfm', 'ct_window', "
                     r"'ct_windows3', 'percentile'\) \(None: the training run's\)$"):
    api.load_for_generation(str(tmp_path / 'nothing_here'), str(tmp_path / 'tok.model'),
                            intensity='ct')


def test_verbose_adds_the_traceback_to_the_one_line(capsys):
  """A bad-input error is one line; `radfm-jax --verbose` prints the traceback above that line."""
  from radfm_jax.cli.main import main
  argv = ['train', '--config', SPEC, '--workdir', 'unused', '--config.train.learning_rate=-1']
  assert main(argv) == 2
  quiet = capsys.readouterr().err.strip().splitlines()
  assert len(quiet) == 1 and quiet[0].startswith(
      'radfm-jax train: config field train.learning_rate=-1')
  assert main(['--verbose'] + argv) == 2
  loud = capsys.readouterr().err.strip().splitlines()
  assert loud[0] == 'Traceback (most recent call last):' and loud[-1] == quiet[0]
  assert any('ConfigError' in line for line in loud[:-1])
