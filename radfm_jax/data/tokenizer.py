"""SentencePiece + the RadFM special-token id layout, and the label rule.

For a base SentencePiece model of V pieces (V = 32000 for LLaMA):

    <image>  = V        </image> = V + 1        <imageK> = V + 2 + K   (K < max_images * num_latents)
    pad = 0 (<unk>)     bos = 1 (<s>)           eos = 2 (</s>)

The special ids are computed, never added to the SentencePiece model, so any base model works.
`encode` matches RadFM's slow `LlamaTokenizer` (transformers 4.28.1; docs/original.md section 7):
special tokens are split out first, whitespace touching them is stripped, each remaining text
chunk is encoded by SentencePiece on its own (so each gets the dummy-prefix '▁'), BOS is
prepended and no EOS appended. `</image>Can you` -> `</image>`, `▁Can`, `▁you`.
"""

from __future__ import annotations

import io
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from radfm_jax.data import prompts
from radfm_jax.data.batch import IGNORE
from radfm_jax.errors import InputError, check_text, escape_surrogates, not_a_file, where

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL = re.compile(r'</image>|<image>|<image(\d+)>')


MAKE_ONE = ('expected a SentencePiece tokenizer.model: train one with `radfm-jax tokenizer train '
            '--manifest samples.jsonl --out tokenizer.model` or use LLaMA\'s (docs/data.md)')


class Tokenizer:
  """`Tokenizer('tokenizer.model')` or `Tokenizer(model_proto_bytes)`; picklable.

  `source` names where a path came from in the InputError of a missing, empty or unreadable one
  (e.g. 'config field data.tokenizer', '--tokenizer'); `expected` ends that message.
  """

  def __init__(self, model_path_or_proto: str | bytes | os.PathLike, max_images: int = 100,
               num_latents: int = 32, *, source: str = 'tokenizer', expected: str = MAKE_ONE):
    if isinstance(model_path_or_proto, (bytes, bytearray)):
      proto = bytes(model_path_or_proto)
    elif not isinstance(model_path_or_proto, (str, os.PathLike)):
      raise InputError(f'{source}: got {type(model_path_or_proto).__name__}; expected the path of '
                       'a SentencePiece tokenizer.model (or its bytes)')
    else:
      path = os.fspath(model_path_or_proto)
      if not path:
        raise InputError(f'{source} is empty; {expected}')
      if not os.path.isfile(path):
        raise InputError(f'{source}={path}: {not_a_file(path)}; {expected}')
      with open(path, 'rb') as f:
        proto = f.read()
    self._proto = proto
    name = source if isinstance(model_path_or_proto, (bytes, bytearray)) else \
        f'{source}={os.fspath(model_path_or_proto)}'
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError:             # sentencepiece: "INTERNAL: ... ParseFromArray ..."
      raise InputError(f'{name}: not a SentencePiece model (does not parse as a ModelProto); '
                       f'{expected}') from None
    if self.sp.get_piece_size() == 0:     # empty bytes parse as a model of no pieces
      raise InputError(f'{name}: a SentencePiece model of no pieces (an empty file?); {expected}')
    for field, value in (('max_images', max_images), ('num_latents', num_latents)):
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f'Tokenizer {field}={value!r}: expected a positive integer')
    self.max_images = max_images
    self.num_latents = num_latents
    self.vocab_size = self.sp.get_piece_size()       # V: first id past the SentencePiece pieces
    self.image_start_id = self.vocab_size             # <image>
    self.image_end_id = self.vocab_size + 1           # </image>
    self.image_token_offset = self.vocab_size + 2     # <image0>
    self.num_image_tokens = max_images * num_latents
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID

  def __getstate__(self):
    return {'proto': self._proto, 'max_images': self.max_images, 'num_latents': self.num_latents}

  def __setstate__(self, state):
    self.__init__(state['proto'], state['max_images'], state['num_latents'])

  def __len__(self) -> int:
    """Ids in use: V pieces + 2 figure tokens + max_images * num_latents image tokens."""
    return self.image_token_offset + self.num_image_tokens

  # ---------------------------------------------------------------------------------------------

  def _special_id(self, match: re.Match) -> int | None:
    text = match.group(0)
    if text == '<image>':
      return self.image_start_id
    if text == '</image>':
      return self.image_end_id
    digits = match.group(1)
    k = int(digits)
    if str(k) != digits or k >= self.num_image_tokens:
      return None                    # not a registered token (e.g. <image007>): plain text
    return self.image_token_offset + k

  def split_special(self, text: str) -> list[str | int]:
    """Text -> chunks: special token ids (int) and stripped text pieces (str, non-empty)."""
    parts: list[str | int] = []
    last = 0
    for m in _SPECIAL.finditer(text):
      sid = self._special_id(m)
      if sid is None:
        continue
      parts.append(text[last:m.start()])
      parts.append(sid)
      last = m.end()
    parts.append(text[last:])
    # Strip whitespace on both sides of every special token (4.28.1 default for plain-string
    # special tokens), then drop empty text chunks.
    for i, part in enumerate(parts):
      if isinstance(part, int):
        if i > 0 and isinstance(parts[i - 1], str):
          parts[i - 1] = parts[i - 1].rstrip()
        if i + 1 < len(parts) and isinstance(parts[i + 1], str):
          parts[i + 1] = parts[i + 1].lstrip()
    return [p for p in parts if isinstance(p, int) or p]

  def encode(self, text: str, add_bos: bool = True, source: str | None = None) -> list[int]:
    """Ids of `text` (BOS first unless `add_bos` is False). Text that is not Unicode (a lone
    surrogate, which every reader of user text refuses first: `errors.not_text`) is an
    InputError naming `source` (where the text came from; default: the text itself), not
    SentencePiece's RuntimeError."""
    ids = [BOS_ID] if add_bos else []
    try:
      for part in self.split_special(text):
        ids.extend([part] if isinstance(part, int) else self.sp.encode(part))
    except RuntimeError:                   # "Unable to cast Python instance of type <class 'str'>"
      check_text(text, source or f'text "{escape_surrogates(text)[:60]}"')
      raise
    return ids

  def id_to_piece(self, i: int) -> str:
    if i < self.vocab_size:
      return self.sp.id_to_piece(i)
    if i == self.image_start_id:
      return '<image>'
    if i == self.image_end_id:
      return '</image>'
    return f'<image{i - self.image_token_offset}>'

  def tokenize(self, text: str) -> list[str]:
    """Pieces without BOS (for inspection and tests)."""
    return [self.id_to_piece(i) for i in self.encode(text, add_bos=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the ids, skipping pad/bos/eos and every figure/image id (skip_special_tokens)."""
    keep = [int(i) for i in ids if PAD_ID != i != BOS_ID and i != EOS_ID and 0 <= i < self.vocab_size]
    return self.sp.decode(keep)

  # ---------------------------------------------------------------------------------------------

  def build_example(self, question: str, answer: str, max_length: int,
                    source: str | None = None) -> dict[str, np.ndarray]:
    """Training arrays for one sample, each [max_length] (docs/original.md sections 8, 11.5).

    tokens:         BOS + encode(question + ' ' + answer), truncated to max_length, pad 0; EOS
                    written at index n = (number of real tokens) when n < max_length.
    attention_mask: 1 on the n real tokens, 0 elsewhere (also 0 on the EOS, as the original).
    labels:         tokens, with -100 on pad (id 0), on ids >= V (figure and image ids) and on
                    the first len(BOS + encode(question)) positions; the EOS label is kept.
    loss_weights:   1.0 where labels != -100, else 0.0.
    `source`: where the sample came from, in the error of text that is not Unicode (`encode`).
    """
    ids = self.encode(question + ' ' + answer, source=source)[:max_length]
    n = len(ids)
    tokens = np.zeros(max_length, np.int32)
    tokens[:n] = ids
    mask = np.zeros(max_length, np.int32)
    mask[:n] = 1
    if n < max_length:
      tokens[n] = EOS_ID
    labels = tokens.copy()
    labels[(tokens == PAD_ID) | (tokens >= self.vocab_size)] = IGNORE
    question_length = len(self.encode(question, source=source))
    labels[:question_length] = IGNORE
    return {'tokens': tokens, 'attention_mask': mask, 'labels': labels,
            'loss_weights': (labels != IGNORE).astype(np.float32)}

  def example_length(self, question: str, answer: str, source: str | None = None) -> int:
    """Positions a sample needs: real tokens + 1 for the EOS (`source`: as for `encode`)."""
    return len(self.encode(question + ' ' + answer, source=source)) + 1


def train_sentencepiece(lines: Iterable[str], out_path: str | None = None, vocab_size: int = 512,
                        model_type: str = 'bpe') -> bytes:
  """Trains a small SentencePiece model with LLaMA's conventions; returns (and writes) the proto.

  unk 0, bos 1, eos 2, no pad piece (pad shares id 0 as in RadFM), byte fallback, digits split,
  and no normalisation (LLaMA's `identity` rule, spaces kept): text decodes to exactly what was
  encoded, where SentencePiece's default NFKC would turn e.g. 'µm' into 'μm'.
  The image symbols are not added: the Tokenizer computes their ids past the vocabulary. vocab_size
  must exceed 256 (byte pieces) + 3 + the distinct characters of the corpus.
  """
  lines = list(lines)
  for n, line in enumerate(lines, 1):      # its own error would be a RuntimeError traceback
    check_text(line, f'tokenizer training text line {n}')
  # SentencePiece skips (with a log line only) every sentence longer than max_sentence_length
  # bytes, 4192 by default: a long report would be dropped from the corpus.
  longest = max((len(line.encode('utf-8')) for line in lines), default=0)
  if not 1 <= vocab_size < 2**31:
    raise InputError(f'vocab size {vocab_size}: expected a positive 32-bit integer')
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
        max_sentence_length=max(4192, longest + 1),
        model_type=model_type, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2)
  except RuntimeError as e:
    # SentencePiece words the limits in its own message; keep its figure, drop the C++ location.
    high = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', str(e))
    if high:
      raise InputError(f'vocab size {high[1]} is too large for this corpus (SentencePiece makes '
                       f'at most {high[2]} pieces of it); expected a vocab size <= {high[2]}, '
                       'with model.llama.vocab_size the same, or more text') from None
    low = re.search(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)', str(e))
    if low:
      raise InputError(f'vocab size {low[1]} is too small for this corpus (its characters and the '
                       f'256 byte pieces need {low[2]}); expected a vocab size >= {low[2]}, with '
                       'model.llama.vocab_size the same') from None
    if 'sentences_.empty()' in str(e):
      raise InputError('no text to train a tokenizer on; expected non-empty lines') from None
    raise
  proto = buf.getvalue()
  if out_path:
    # Whole or not at all (store.write_bytes): a cut tokenizer.model left by a kill or a full
    # disk would fail only when training loads it, and block the rerun (`--out` exists).
    from radfm_jax.data.store import write_bytes
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    write_bytes(out_path, proto)
  return proto


def text_lines(path: str, expected: str, name: str | None = None) -> list[tuple[int, str]]:
  """(line number from 1, text without its line ending) of every line of a UTF-8 text file.

  A missing file, a folder or bytes that are not UTF-8 are an InputError naming `name` (how the
  user passed the file, e.g. '--text notes.txt'; default: the path) and, for bad bytes, the line,
  worded as `store.iter_jsonl` words it for a manifest; `expected` ends the message. The lines are
  decoded one by one, not the whole file, so the error can say which line it is.
  """
  name = name or str(path)
  if os.path.isdir(path):
    raise InputError(f'{name}: a folder; {expected}')
  if not os.path.isfile(path):
    raise InputError(f'{name}: no such file; {expected}')
  lines = []
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      try:
        lines.append((n, raw.decode('utf-8').rstrip('\r\n')))
      except UnicodeDecodeError as e:
        raise InputError(f'{where(name, n)}: not UTF-8 text ({e.reason}, column {e.start + 1}); '
                         f'{expected}') from None
  return lines


def corpus_lines(records: Iterable[dict]) -> list[str]:
  """Texts to train a tokenizer on: each manifest record's question and answer as the model sees
  them (`prompts.format_sample` without the image blocks: an empty question from the task's
  templates, a report answer from its findings), then every template wording and task
  description, so questions rendered for other samples are covered too. Empty texts are left out.
  """
  lines = []
  for r in records:
    question, answer, _ = prompts.format_sample(dict(r, images=[]))
    lines += [question, answer]
  for task in prompts.TASKS:
    t = prompts.load_templates(task)
    for key in ('questions', 'yes_no_questions'):
      lines += [q.replace('{', '').replace('}', '') for q in t.get(key, [])]
    lines.append(t.get('description', ''))
  return [line for line in lines if line.strip()]


def image_ids(tokenizer: Tokenizer, image_index: int) -> Sequence[int]:
  """Ids of the num_latents placeholders of image `image_index`."""
  start = tokenizer.image_token_offset + image_index * tokenizer.num_latents
  return range(start, start + tokenizer.num_latents)
