"""Bad text and bad output paths (a bad-input probe): each is one line naming the file, line and
field (or the flag and path), exit 2, nothing written.

1. A lone surrogate (JSON's "\\ud800" escape, or a byte of argv that is not UTF-8) is valid JSON
   but not text: it was stored by ingest and crashed tokenizer train, train, eval and generate
   later (UnicodeEncodeError, a SentencePiece RuntimeError traceback).
2. An output path through a symlink to a missing target (an unmounted disk), or in a folder that
   takes no new entries (/proc): a FileNotFoundError / FileExistsError traceback in every writing
   command.
3. A checkpoint of another size: one ~10 KB line listing every wrong shape.
"""

import errno
import json
import os
import sys
import tempfile

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.cli.main import main
from radfm_jax.errors import InputError, WriteError, check_parent_folder, not_text

SURROGATE = 'holds a lone surrogate \\ud800 (not Unicode text); expected UTF-8 text'


def _err_lines(capsys):
  return capsys.readouterr().err.strip().splitlines()


def _jsonl(path, *rows):
  """json.dumps writes a str's lone surrogate as the escape "\\ud800" (ensure_ascii)."""
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


# ------------------------------------------------------------------------------------------------
# 1. lone surrogates


def test_not_text_names_the_first_field_with_a_surrogate():
  assert not_text({'a': ['ok', 'é', {'b': 'fine'}]}) is None
  assert not_text('x\ud800') == (None, SURROGATE)
  assert not_text({'a': [1, {'b': 'x\udcff'}]}) == (
      'a[1].b', 'holds a lone surrogate \\udcff (not Unicode text); expected UTF-8 text')
  assert not_text({'k\ud800': 1}) == ('k\\ud800', SURROGATE)      # a key, shown escaped


def test_manifest_line_with_a_surrogate_is_refused_by_ingest_and_tokenizer_train(tmp_path,
                                                                                 capsys):
  manifest = _jsonl(tmp_path / 'samples.jsonl',
                    {'id': 'a', 'question': 'Is it?', 'answer': 'yes', 'images': []},
                    {'id': 'b', 'question': 'Is it?', 'answer': 'no', 'images': []},
                    {'id': 'c', 'question': 'x\ud800', 'answer': 'y', 'images': []})
  store = tmp_path / 'store'
  assert main(['ingest', '--manifest', manifest, '--out', str(store), '--no-progress']) == 2
  assert _err_lines(capsys) == [f'radfm-jax ingest: {manifest} line 3 field question: {SURROGATE}']
  assert not store.exists()
  out = tmp_path / 'tokenizer.model'
  assert main(['tokenizer', 'train', '--manifest', manifest, '--out', str(out)]) == 2
  assert _err_lines(capsys) == [f'radfm-jax tokenizer: {manifest} line 3 field question: '
                                f'{SURROGATE}']
  assert not out.exists()


def test_a_surrogate_in_any_field_of_a_manifest_is_named(tmp_path):
  """The user's own fields (kept through ingest) and image fields too; in-memory records and a
  store manifest (what training and eval read) the same way."""
  from radfm_jax.data.manifest import read_manifest, validate_records
  with pytest.raises(InputError) as e:
    validate_records([{'id': 'a', 'answer': 'ok'}, {'id': 'b', 'tags': ['x', 'y\ud800']}])
  assert str(e.value) == f'manifest record 2 field tags[1]: {SURROGATE}'
  with pytest.raises(InputError) as e:
    validate_records([{'id': 'a', 'images': [{'path': 'a.png', 'modality': 'C\ud800'}]}])
  assert str(e.value) == f'manifest record 1 field images[0].modality: {SURROGATE}'
  stored = _jsonl(tmp_path / 'manifest.jsonl', {
      'id': 'a', 'question': 'q', 'answer': 'fine\ud800', 'task': '',
      'images': [{'id': 's1', 'shape': [1, 4, 4, 1], 'position': {'question': 0}}]})
  with pytest.raises(InputError) as e:
    read_manifest(stored, split='train')
  assert str(e.value) == f'{stored} line 1 field answer: {SURROGATE}'


def test_generate_prompt_and_prompts_file_with_a_surrogate(tmp_path, capsys, monkeypatch):
  import radfm_jax.cli.generate as generate_cli

  def no_work(args):
    raise AssertionError('the model was loaded')
  monkeypatch.setattr(generate_cli, 'load', no_work)
  # a byte of argv that is not UTF-8 (here 0xff) reaches Python as the surrogate \udcff
  assert main(['generate', '--checkpoint', str(tmp_path), '--prompt', 'Is it\udcff?']) == 2
  assert _err_lines(capsys) == ['radfm-jax generate: --prompt: holds a lone surrogate \\udcff '
                                '(not Unicode text); expected UTF-8 text']
  prompts = _jsonl(tmp_path / 'prompts.jsonl', {'id': 'q1', 'prompt': 'ok', 'images': []},
                   {'id': 'q2', 'prompt': 'x\ud800', 'images': []})
  out = tmp_path / 'answers.jsonl'
  assert main(['generate', '--checkpoint', str(tmp_path), '--input', prompts, '--output',
               str(out)]) == 2
  assert _err_lines(capsys) == [f'radfm-jax generate: {prompts} line 2 field prompt: {SURROGATE}']
  assert not out.exists()


def test_recipe_json_row_with_a_surrogate_is_a_counted_reject(tmp_path):
  from radfm_jax.data import recipes
  from radfm_jax.data.recipes.files import read_json_file
  img = tmp_path / 'img'
  img.mkdir()
  np.save(img / 'case1.npy', np.zeros((2, 1, 4, 4, 2), np.float32))     # a case [S, C, H, W, D]
  article = {'pat': '60 years, male.', 'pre': 'Cough.', 'npy_path': 'case1.npy',
             'finding': 'A mass.', 'impression': 'Tumour.'}
  split = tmp_path / 'radiology_article_npy_test.json'
  split.write_text(json.dumps([article, dict(article, finding='A mass\ud800.')]))
  assert '\\ud800' in split.read_text()
  res = recipes.records('radio_caption', str(split), str(img))
  assert [r['reason'] for r in res.rejects] == [f'{split} [1] field finding: {SURROGATE}']
  assert [r['field'] for r in res.rejects] == ['finding']
  assert [r['id'] for r in res.records] == ['radio_caption-test-0']
  # a side file: a whole-file error naming it and the field
  side = tmp_path / 'modality_set.json'
  side.write_text(json.dumps({'modality': ['CT', 'M\ud800']}))
  with pytest.raises(InputError) as e:
    read_json_file(str(side), 'the RadFM modality list')
  assert str(e.value) == f'{side} field modality[1]: {SURROGATE}'
  # a CSV file cannot hold one: its UTF-8 decoding refuses the encoded surrogate (ED A0 80)
  csv_file = tmp_path / 'vqarad_test.csv'
  csv_file.write_bytes(b'img_root_dir,Figure_path,Question,Answer\n,a.png,x\xed\xa0\x80,no\n')
  with pytest.raises(InputError, match=r'vqarad_test\.csv line 2: not UTF-8 text'):
    recipes.records('vqa_rad', str(csv_file), str(img))


def test_tokenizer_refuses_surrogates_with_our_error():
  """The last line of defence: text no reader checked (a library caller's) is an InputError
  naming where it came from, not SentencePiece's RuntimeError."""
  from radfm_jax.data.tokenizer import train_sentencepiece
  tok = cd.tokenizer(max_images=2, num_latents=4)
  assert tok.encode('no fracture') == tok.encode('no fracture', source='sample 1')
  with pytest.raises(InputError) as e:
    tok.encode('Is it\ud800?', source="sample 'c'")
  assert str(e.value) == f"sample 'c': {SURROGATE}"
  with pytest.raises(InputError) as e:
    tok.encode('Is it\ud800?')
  assert str(e.value) == f'text "Is it\\ud800?": {SURROGATE}'
  with pytest.raises(InputError) as e:
    tok.build_example('q', 'a\ud800', 16, source="sample 'd'")
  assert str(e.value) == f"sample 'd': {SURROGATE}"
  with pytest.raises(InputError) as e:
    train_sentencepiece(list(cd.CORPUS) + ['bad\ud800 line'], vocab_size=300)
  assert str(e.value) == f'tokenizer training text line {len(cd.CORPUS) + 1}: {SURROGATE}'


# ------------------------------------------------------------------------------------------------
# 2. output paths through a broken symlink, or where nothing can be made


@pytest.fixture
def broken(tmp_path):
  """tmp/dl -> tmp/unmounted/data, which does not exist (an unmounted disk)."""
  link = tmp_path / 'dl'
  target = tmp_path / 'unmounted' / 'data'
  os.symlink(target, link)
  return link, target


def _inputs(tmp_path):
  manifest = _jsonl(tmp_path / 'samples.jsonl', {'id': 'a', 'question': 'q', 'answer': 'a'})
  checkpoint = tmp_path / 'model.bin'
  checkpoint.write_bytes(b'')
  return manifest, str(checkpoint)


STORE = 'expected a folder for the store (nothing was written)'
RUN = "expected the run's folder (new, or one to resume)"
ANSWERS = 'expected a file path for the answers (JSONL)'
CASES = [   # (command, argv with {m} manifest, {c} checkpoint, {o} the output; the path; expected)
    ('ingest', ['ingest', '--manifest', '{m}', '--out', '{o}', '--no-progress'], 'st', STORE),
    ('ingest', ['ingest', '--manifest', '{m}', '--out', '{o}', '--no-progress'], '', STORE),
    ('tokenizer', ['tokenizer', 'train', '--manifest', '{m}', '--out', '{o}'], 't.model',
     'expected the path of the tokenizer.model file to write'),
    ('eval', ['eval', '--predictions', '{m}', '--out', '{o}', '--entities', 'none'], 'ev',
     'expected a folder (new or existing) for summary.json'),
    ('generate', ['generate', '--checkpoint', '{c}', '--prompt', 'hi', '--output', '{o}'],
     'a.jsonl', ANSWERS),
    ('generate', ['generate', '--checkpoint', '{c}', '--prompt', 'hi', '--output', '{o}'], '',
     ANSWERS),
    ('convert', ['convert', 'to-torch', '--checkpoint', '{c}', '--out', '{o}'],
     'a.safetensors', 'expected a file path (.bin or .safetensors)'),
    ('convert', ['convert', 'from-torch', '--checkpoint', '{c}', '--out', '{o}'], 'ckpt',
     'expected a new checkpoint folder'),
    ('convert', ['convert', 'from-torch', '--checkpoint', '{c}', '--out', '{o}'], '',
     'expected a new checkpoint folder'),
    ('train', ['train', '--config', 'radfm:model=tiny,mesh=cpu', '--workdir', '{o}',
               '--config.data.store=synthetic'], 'run', RUN),
    ('train', ['train', '--config', 'radfm:model=tiny,mesh=cpu', '--workdir', '{o}',
               '--config.data.store=synthetic'], '', RUN),
    ('publish', ['publish', '--data', '{m}', '--out', '{o}'], 'tf',
     'expected the TFDS data folder to write into'),
]


@pytest.mark.parametrize('command,argv,below,expected', CASES,
                         ids=[f'{c[1][0]}-{c[1][1]}-{c[2] or "link"}' for c in CASES])
def test_output_through_a_broken_symlink_is_one_line(tmp_path, broken, capsys, command, argv,
                                                     below, expected):
  link, target = broken
  manifest, checkpoint = _inputs(tmp_path)
  out = str(link / below) if below else str(link)
  before = sorted(os.listdir(tmp_path))
  argv = [a.format(m=manifest, c=checkpoint, o=out) for a in argv]
  assert main(argv) == 2
  flag = argv[argv.index(out) - 1]
  assert _err_lines(capsys) == [f'radfm-jax {command}: {flag} {out}: {link} is a symlink to a '
                                f'missing target ({target}); {expected}']
  assert sorted(os.listdir(tmp_path)) == before and not os.path.lexists(target.parent)


def test_check_parent_folder_names_a_loop_and_an_unwritable_folder(tmp_path, monkeypatch):
  os.symlink('b', tmp_path / 'a')
  os.symlink('a', tmp_path / 'b')
  with pytest.raises(InputError) as e:
    check_parent_folder(str(tmp_path / 'a' / 'x'), '--out A', 'expected a folder')
  assert str(e.value) == f'--out A: {tmp_path}/a is in a loop of symlinks (b); expected a folder'
  # a writable folder: the probe leaves nothing behind
  new = tmp_path / 'new'
  new.mkdir()
  check_parent_folder(str(new / 'deeper' / 'out'), '--out B', 'expected a folder')
  assert os.listdir(new) == []
  # a folder whose os.access says yes (root) but that takes no new entry (a read-only mount)

  def refused(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  monkeypatch.setattr(tempfile, 'mkdtemp', refused)
  with pytest.raises(WriteError) as e:
    check_parent_folder(str(new / 'out'), '--out C', 'expected a folder')
  assert str(e.value) == (f'--out C: {new}: could not write (Read-only file system); expected a '
                          'folder this user can write')


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='no /proc')
def test_ingest_into_proc_is_one_line(tmp_path, capsys):
  manifest, _ = _inputs(tmp_path)
  assert main(['ingest', '--manifest', manifest, '--out', '/proc/radfm_x', '--no-progress']) == 2
  (line,) = _err_lines(capsys)
  assert line.startswith('radfm-jax ingest: --out /proc/radfm_x: /proc: could not write (')
  assert line.endswith('); expected a folder this user can write')
  assert not os.path.exists('/proc/radfm_x')


# ------------------------------------------------------------------------------------------------
# 3. a checkpoint of another size: the wrong shapes are capped as the missing keys are


def test_wrong_shapes_are_capped():
  from radfm_jax.convert.engine import CheckpointMismatchError
  wrong = [(f'k{i:02d}', (1,), (2,)) for i in range(81)]
  e = CheckpointMismatchError(wrong_shape=wrong)
  text = str(e)
  assert text == ('checkpoint does not match the key map; wrong shapes (key, found, expected) of '
                  '81 keys: ' + ', '.join(f'(k{i:02d}, (1,), (2,))' for i in range(20))
                  + ' ... and 61 more')
  assert e.wrong_shape == wrong                  # every one is kept on the exception
  assert 'wrong shapes (key, found, expected) of 1 keys: (k, (1,), (2,))' in str(
      CheckpointMismatchError(wrong_shape=[('k', (1,), (2,))]))


def test_convert_with_a_config_of_another_size_is_one_short_line(tmp_path, tiny_cfg, capsys):
  pytest.importorskip('torch')
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  sys.path.insert(0, os.path.dirname(__file__))
  from convert_fixtures import official_state_dict
  sd = official_state_dict(tiny_cfg, seed=5, keep_dead=False)
  path = str(tmp_path / 'tiny.safetensors')
  safetensors_numpy.save_file({k: v.numpy() for k, v in sd.items()
                               if k != 'embedding_layer.weight'}, path)
  out = tmp_path / 'out'
  assert main(['convert', 'from-torch', '--checkpoint', path, '--config', 'radfm:model=small',
               '--out', str(out)]) == 2
  (line,) = _err_lines(capsys)
  assert line.startswith(f'radfm-jax convert: {path}: checkpoint does not match the key map; '
                         'missing keys (')
  shapes = line.split('; wrong shapes (key, found, expected) of ')[1]
  count, listed = shapes.split(' keys: ')
  assert int(count) > 20
  assert listed.endswith(f' ... and {int(count) - 20} more')
  assert listed.count(')), (') == 19           # 20 shown
  assert len(line) < 5000
  assert not out.exists()
