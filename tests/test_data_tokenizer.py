"""Tokenizer id layout and 4.28.1 splitting, label rule, prompts and image placement."""

import pickle
import random
import struct

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.data import prompts
from radfm_jax.data.tokenizer import Tokenizer, image_ids


@pytest.fixture(scope='module')
def tok():
  return cd.tokenizer(max_images=10, num_latents=32)


def test_trained_model_follows_llama_conventions(tok):
  sp = tok.sp
  assert tok.vocab_size == 512
  assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ('<unk>', '<s>', '</s>')
  assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == -1
  assert sp.id_to_piece(3) == '<0x00>'                      # byte fallback pieces follow
  assert '<image>' not in {sp.id_to_piece(i) for i in range(tok.vocab_size)}


def test_special_id_layout(tok):
  v = tok.vocab_size
  ids = tok.encode('<image><image0><image31></image>', add_bos=False)
  assert ids == [v, v + 2, v + 2 + 31, v + 1]
  assert tok.encode('<image319>', add_bos=False) == [v + 2 + 319]
  assert list(image_ids(tok, 2)) == list(range(v + 2 + 64, v + 2 + 96))
  assert len(tok) == v + 2 + 10 * 32
  # Beyond max_images * num_latents, or with a leading zero, it is plain text.
  assert v + 2 + 320 not in tok.encode('<image320>') and len(tok.encode('<image320>')) > 2
  assert all(i < v for i in tok.encode('<image007>'))


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append((n & 0x7f) | (0x80 if n > 0x7f else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _filler_pieces(first: int, last: int) -> bytes:
  """Serialized `ModelProto.pieces` entries (field 1) for ids first..last-1: piece, score -1e9,
  type NORMAL. Written as wire bytes, which a parser appends to the repeated field in order,
  because importing `sentencepiece_model_pb2` fails when the installed protobuf runtime is older
  than the gencode sentencepiece ships (apache-beam, in the test extra, pins protobuf < 7)."""
  out = bytearray()
  for i in range(first, last):
    name = f'\u2581filler{i + 1}'.encode()
    sub = (b'\x0a' + _varint(len(name)) + name + b'\x15' + struct.pack('<f', -1e9)
           + b'\x18' + _varint(1))
    out += b'\x0a' + _varint(len(sub)) + sub
  return bytes(out)


def test_llama_sized_vocab_layout(tok):
  # Grow the test model to LLaMA's 32000 pieces (unused filler pieces): ids are exactly RadFM's.
  proto = cd.spm_proto() + _filler_pieces(tok.vocab_size, 32000)
  t = Tokenizer(proto, max_images=100)
  assert t.vocab_size == 32000 and len(t) == 35202
  assert t.encode('<image></image><image0><image3199>', add_bos=False) == [32000, 32001, 32002, 35201]
  assert t.encode('</image>Can you') == [1, 32001] + tok.sp.encode('Can you')


def test_splitting_strips_whitespace_and_adds_dummy_prefix(tok):
  assert tok.tokenize('</image>Can you')[:2] == ['</image>', '▁Can']
  assert tok.tokenize('</image>Can you') == ['</image>'] + tok.sp.encode('Can you', out_type=str)
  text = 'What is this?  <image> <image0>  </image>  Can you see it'
  ids = tok.encode(text)
  want = ([1] + tok.sp.encode('What is this?') + [tok.image_start_id, tok.image_token_offset,
                                                  tok.image_end_id] + tok.sp.encode('Can you see it'))
  assert ids == want
  assert ids[0] == 1 and ids[-1] != 2                       # BOS, no EOS
  assert tok.encode('') == [1]


def test_decode_skips_specials(tok):
  ids = tok.encode('<image><image0></image>The image shows a nodule.') + [2, 0, 0]
  assert tok.decode(ids) == 'The image shows a nodule.'


def test_build_example_label_rule(tok):
  q = prompts.image_block(0, 32) + 'What is shown?'
  a = 'A nodule.'
  ex = tok.build_example(q, a, 64)
  ids = tok.encode(q + ' ' + a)
  n = len(ids)
  qlen = len(tok.encode(q))
  assert qlen == 1 + 34 + len(tok.sp.encode('What is shown?'))
  np.testing.assert_array_equal(ex['tokens'][:n], ids)
  assert ex['tokens'][n] == 2 and (ex['tokens'][n + 1:] == 0).all()
  assert ex['attention_mask'].sum() == n and ex['attention_mask'][n] == 0   # EOS mask left 0
  labels = ex['labels']
  assert (labels[:qlen] == -100).all()                      # BOS + question (incl. image ids)
  np.testing.assert_array_equal(labels[qlen:n], ids[qlen:])  # answer tokens kept
  assert labels[n] == 2 and (labels[n + 1:] == -100).all()   # EOS label kept, pad ignored
  np.testing.assert_array_equal(ex['loss_weights'], (labels != -100).astype(np.float32))
  assert {k: v.dtype for k, v in ex.items()} == {'tokens': np.int32, 'attention_mask': np.int32,
                                                 'labels': np.int32, 'loss_weights': np.float32}
  # An image in the answer is ignored too; a full sequence has no EOS.
  ex = tok.build_example('Q?', 'See ' + prompts.image_block(1, 32) + ' here.', 80)
  assert not ((ex['labels'] >= tok.vocab_size)).any()
  full = tok.build_example('Q?', 'word ' * 50, 8)
  assert (full['attention_mask'] == 1).all() and 2 not in full['tokens']


def test_tokenizer_pickles(tok):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode('<image>Can you') == tok.encode('<image>Can you')
  assert clone.max_images == 10


def test_image_block_and_placement():
  block = prompts.image_block(1, 4)
  assert block == '<image><image4><image5><image6><image7></image>'
  b0, b1 = prompts.image_block(0, 4), prompts.image_block(1, 4)
  # Inserted before character max(pos - 1, 0): pos = len(text) lands before the last character.
  q, a = prompts.place_images('Is it a chest scan?', 'Yes.', [{'question': 19}, {'question': 0}],
                              num_latents=4)
  assert q == b1 + 'Is it a chest scan' + b0 + '?' and a == 'Yes.'
  q, a = prompts.place_images('Q?', 'An answer.', [{'answer': 1}, {'answer': 1}], num_latents=4)
  assert q == 'Q?' and a == b0 + b1 + 'An answer.'           # same point keeps manifest order
  q, _ = prompts.place_images('Compare', '', [{'question': 3}, {'question': 6}], num_latents=4)
  assert q == 'Co' + b0 + 'mpa' + b1 + 're'
  with pytest.raises(ValueError, match='position'):
    prompts.place_images('Q', 'A', [{'context': 1}])


def test_templates_and_format_sample():
  for task in prompts.TASKS:
    t = prompts.load_templates(task)
    assert t['task'] == task and t['questions']
  q = prompts.render_question('diagnosis_yes_no', random.Random(0), finding='pneumonia')
  assert 'pneumonia' in q and q.endswith('?')
  q = prompts.render_question('modality', random.Random(0), yes_no=True, modality='MRI')
  assert 'MRI' in q
  rec = {'id': 'x', 'task': 'diagnosis_yes_no', 'finding': 'a fracture', 'answer': '• yes',
         'images': [{'id': 'a', 'position': {'question': 0}}, {'id': 'b', 'position': {'answer': 0}},
                    {'id': 'c', 'position': {'question': 0}}]}
  q, a, n = prompts.format_sample(rec, num_latents=2, max_images=2)
  assert n == 2 and 'a fracture' in q and q.startswith(prompts.image_block(0, 2))
  assert a == prompts.image_block(1, 2) + ' yes' and '<image4>' not in q + a
  assert prompts.format_sample(rec, 2, 2) == (q, a, n)       # same wording every time
  rec = {'id': 'r', 'task': 'report', 'findings': 'Clear lungs.', 'impression': 'Normal.'}
  q, a, n = prompts.format_sample(rec)
  assert a == 'Findings: Clear lungs. Impression: Normal.' and n == 0 and q


def _original_text_add_image(question, answer, positions, blocks):
  """The original's multi_dataset.text_add_image (a transcription): each image's block goes
  before character max(pos - 1, 0) of the raw text, then '•' is removed from the answer."""
  def place(text, field):
    at = [[] for _ in text]
    for i, pos in enumerate(positions):
      (key, value), = pos.items()
      if key == field:
        at[max(value - 1, 0)].append(i)
    return ''.join(''.join(blocks[i] for i in at[c]) + text[c] for c in range(len(text)))
  return place(question, 'question'), place(answer, 'answer').replace('•', '')


def test_bullets_are_removed_after_the_images_are_placed():
  """An answer position counts the answer's characters as given, bullets included (the original
  removes '•' after placing the blocks): at len(answer) the block lands before the last
  character. Before, the bullets were removed first and the block went after it."""
  answer = '• A mass. • A cyst.'
  positions = [{'question': 0}, {'answer': len(answer)}, {'answer': 4}]
  rec = {'id': 'b', 'question': 'What is seen?', 'answer': answer,
         'images': [{'id': str(i), 'position': p} for i, p in enumerate(positions)]}
  q, a, n = prompts.format_sample(rec, num_latents=2)
  blocks = [prompts.image_block(i, 2) for i in range(3)]
  assert (q, a) == _original_text_add_image('What is seen?', answer, positions, blocks)
  assert a.endswith(blocks[1] + '.') and n == 3


def test_long_lines_stay_in_the_corpus():
  """SentencePiece skips sentences longer than its max_sentence_length (4192 bytes by default),
  with a log line only: a character that occurs only in a long report was missing from the
  vocabulary. train_sentencepiece raises the limit to the longest line."""
  import sentencepiece as spm
  from radfm_jax.data.tokenizer import train_sentencepiece
  long_report = ' '.join(['The liver is normal in size Ω.'] * 200)      # ~6.4 KB
  assert len(long_report.encode()) > 4192
  proto = train_sentencepiece(list(cd.CORPUS) + [long_report], vocab_size=400)
  sp = spm.SentencePieceProcessor(model_proto=proto)
  assert sp.piece_to_id('Ω') != sp.unk_id()
  assert 'Ω' in {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
