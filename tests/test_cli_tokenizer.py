"""`radfm-jax tokenizer train` in a subprocess: from a manifest and from a text file, the model
loads with the RadFM id layout and round-trips text; a missing / empty / bad tokenizer anywhere is
one error line naming the field or flag and `radfm-jax tokenizer train` (exit code 2)."""

import json
import os
import subprocess
import sys

import pytest

from radfm_jax.data import prompts
from radfm_jax.data.tokenizer import BOS_ID, MAKE_ONE, Tokenizer
from radfm_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = [
    {'id': 'a', 'question': 'Is there a pleural effusion?', 'answer': 'Yes, on the left side.',
     'images': [{'path': 'scans/a.png', 'modality': 'X-ray'}]},
    {'id': 'b', 'task': 'report', 'findings': 'A 12 mm nodule in the right upper lobe.',
     'impression': 'Pulmonary nodule.', 'images': [{'path': 'scans/b.nii.gz'}]},
    {'id': 'c', 'task': 'diagnosis_yes_no', 'finding': 'haemorrhage', 'answer': 'No.'},
]


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'radfm_jax.cli', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _check_layout(path: str, vocab: int):
  tok = Tokenizer(path, max_images=4, num_latents=32)
  assert tok.vocab_size == vocab
  assert [tok.sp.id_to_piece(i) for i in range(3)] == ['<unk>', '<s>', '</s>']
  block = prompts.image_block(1)
  ids = tok.encode(f'Compare{block}this.')
  assert ids[0] == BOS_ID
  start = ids.index(vocab)                                         # <image> = V
  assert ids[start:start + 34] == [vocab] + list(range(vocab + 2 + 32, vocab + 2 + 64)) + [vocab + 1]
  assert max(i for i in ids if i not in range(vocab, vocab + 2 + 128)) < vocab
  return tok


def test_train_from_manifest(tmp_path):
  manifest = tmp_path / 'samples.jsonl'
  manifest.write_text(''.join(json.dumps(r) + '\n' for r in RECORDS))
  out = tmp_path / 'tok' / 'tokenizer.model'
  proc = _cli('tokenizer', 'train', '--manifest', str(manifest), '--out', str(out),
              '--vocab-size', '600')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == (f'{out}: 600 pieces (<unk>/pad 0, <s> 1, </s> 2), <image> 600, '
                         f'</image> 601, <imageK> 602+K; train with --config.data.tokenizer={out} '
                         '--config.model.llama.vocab_size=600\n')
  tok = _check_layout(str(out), 600)
  # Every text the model will see round-trips, the rendered template questions included.
  for rec in RECORDS:
    question, answer, _ = prompts.format_sample(dict(rec, images=[]))
    for text in (question, answer):
      assert tok.decode(tok.encode(text)) == text
  assert 'Findings: A 12 mm nodule' in prompts.format_sample(RECORDS[1])[1]
  # An existing --out is not replaced without --overwrite.
  before = out.read_bytes()
  proc = _cli('tokenizer', 'train', '--manifest', str(manifest), '--out', str(out))
  assert proc.returncode == 2 and proc.stderr == (
      f'radfm-jax tokenizer: --out {out}: exists; expected a new file (or --overwrite to replace '
      'it; a run trained with it needs the same file)\n')
  assert out.read_bytes() == before


def test_train_from_text_file_and_its_errors(tmp_path):
  text = tmp_path / 'reports.txt'
  lines = ['The liver is normal in size.', '', 'No focal lesion; 3 cysts of 12 mm.',
           'Ünïcode: ±5 HU, 10°.']
  text.write_text('\n'.join(lines * 20) + '\n', encoding='utf-8')
  out = tmp_path / 'tokenizer.model'
  proc = _cli('tokenizer', 'train', '--text', str(text), '--out', str(out), '--vocab-size', '300')
  assert proc.returncode == 0, proc.stderr
  tok = _check_layout(str(out), 300)
  for line in lines[2:] + ['Unseen words round-trip too: 42 µm!']:   # byte fallback
    assert tok.decode(tok.encode(line)) == line

  too_big = _cli('tokenizer', 'train', '--text', str(text), '--out', str(tmp_path / 'big.model'),
                 '--vocab-size', '5000')
  err = too_big.stderr
  assert too_big.returncode == 2 and len(err.splitlines()) == 1, err
  assert err.startswith('radfm-jax tokenizer: vocab size 5000 is too large for this corpus '
                        '(SentencePiece makes at most ')
  assert not (tmp_path / 'big.model').exists()
  too_small = _cli('tokenizer', 'train', '--text', str(text), '--out', str(tmp_path / 's.model'),
                   '--vocab-size', '100')
  assert too_small.returncode == 2 and too_small.stderr.startswith(
      'radfm-jax tokenizer: vocab size 100 is too small for this corpus (its characters and the '
      '256 byte pieces need 2'), too_small.stderr
  assert len(too_small.stderr.splitlines()) == 1
  missing = _cli('tokenizer', 'train', '--text', str(tmp_path / 'nope.txt'), '--out', str(out),
                 '--overwrite')
  assert missing.returncode == 2 and missing.stderr == (
      f'radfm-jax tokenizer: --text {tmp_path / "nope.txt"}: no such file; expected a UTF-8 text '
      'file, one sentence per line\n')
  both = _cli('tokenizer', 'train', '--text', str(text), '--manifest', 'm.jsonl', '--out', 'x')
  assert both.returncode == 2 and 'not allowed with argument' in both.stderr


def test_bad_manifest_names_line_and_field(tmp_path):
  manifest = tmp_path / 'samples.jsonl'
  manifest.write_text(json.dumps(RECORDS[0]) + '\n' + '{"task": "rationale"}\n')
  proc = _cli('tokenizer', 'train', '--manifest', str(manifest), '--out', str(tmp_path / 't'))
  assert proc.returncode == 2 and proc.stderr == (
      f'radfm-jax tokenizer: {manifest} line 2 field diagnosis: missing; expected string (the '
      'question is empty, so it comes from the templates of task rationale, which use '
      '{diagnosis})\n')


def test_train_without_a_tokenizer_is_one_line_exit_2(tmp_path):
  proc = _cli('train', '--config', 'radfm:model=tiny', '--workdir', str(tmp_path / 'run'),
              f'--config.data.store={tmp_path / "store"}', '--no-progress', cwd=str(tmp_path))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr == f'radfm-jax train: config field data.tokenizer is empty; {MAKE_ONE}\n'
  assert 'radfm-jax tokenizer train --manifest' in MAKE_ONE


def test_missing_tokenizer_file_names_the_config_field(tmp_path):
  from radfm_jax.config import load_config
  from radfm_jax.data.pipeline import make_dataset
  from radfm_jax.train.loop import make_data
  cfg = load_config('radfm:model=tiny', [f'data.store={tmp_path}', 'data.tokenizer=nope.model'])
  for call in (lambda: make_data(cfg), lambda: make_dataset(cfg.data, cfg.model)):
    with pytest.raises(InputError) as e:
      call()
    assert str(e.value) == f'config field data.tokenizer=nope.model: no such file; {MAKE_ONE}'


def test_tokenizer_class_errors(tmp_path):
  junk = tmp_path / 'junk.model'
  junk.write_bytes(b'not a model')
  with pytest.raises(InputError) as e:
    Tokenizer(str(junk), source='--tokenizer')
  assert str(e.value) == (f'--tokenizer={junk}: not a SentencePiece model (does not parse as a '
                          f'ModelProto); {MAKE_ONE}')
  with pytest.raises(InputError, match='^tokenizer is empty; expected a SentencePiece'):
    Tokenizer('')


def test_text_not_utf8_and_bad_out_are_one_line_exit_2(tmp_path, capsys):
  """--text with bytes that are not UTF-8 names the file and line, as --manifest does (before: a
  UnicodeDecodeError traceback); a --text folder, and an --out that is a folder or lies under a
  file, are one line too, before any training (before: a traceback after training); so is an
  --out that is the --text file itself."""
  from radfm_jax.cli.main import main
  text = tmp_path / 'latin1.txt'
  text.write_bytes(b'hello\ncaf\xe9\n')
  proc = _cli('tokenizer', 'train', '--text', str(text), '--out', str(tmp_path / 't.model'),
              '--vocab-size', '64')
  assert proc.returncode == 2 and proc.stderr == (
      f'radfm-jax tokenizer: --text {text} line 2: not UTF-8 text (invalid continuation byte, '
      'column 4); expected a UTF-8 text file, one sentence per line\n'), proc.stderr
  good = tmp_path / 'good.txt'
  good.write_text('The liver is normal.\n' * 20)
  expected = 'expected the path of the tokenizer.model file to write'
  for argv, line in (
      (['--text', str(tmp_path), '--out', str(tmp_path / 't.model')],
       f'--text {tmp_path}: a folder; expected a UTF-8 text file, one sentence per line'),
      (['--text', str(good), '--out', str(tmp_path), '--overwrite'],
       f'--out {tmp_path}: a folder; {expected}'),
      (['--text', str(good), '--out', str(good / 't.model')],
       f'--out {good / "t.model"}: {good} is not a directory; {expected}'),
      # --overwrite wrote the model over the text it was trained on (and a manifest likewise)
      (['--text', str(good), '--out', str(good), '--overwrite'],
       f'--out {good}: is the --text file the tokenizer is trained on; expected another path '
       'for the tokenizer.model')):
    assert main(['tokenizer', 'train', '--vocab-size', '300'] + argv) == 2
    assert capsys.readouterr().err == f'radfm-jax tokenizer: {line}\n'
  assert good.read_text() == 'The liver is normal.\n' * 20
