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

from radfm_jax.data.batch import IGNORE

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL = re.compile(r'</image>|<image>|<image(\d+)>')


class Tokenizer:
  """`Tokenizer('tokenizer.model')` or `Tokenizer(model_proto_bytes)`; picklable."""

  def __init__(self, model_path_or_proto: str | bytes | os.PathLike, max_images: int = 100,
               num_latents: int = 32):
    if isinstance(model_path_or_proto, (bytes, bytearray)):
      proto = bytes(model_path_or_proto)
    else:
      with open(model_path_or_proto, 'rb') as f:
        proto = f.read()
    self._proto = proto
    self.sp = spm.SentencePieceProcessor(model_proto=proto)
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

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = [BOS_ID] if add_bos else []
    for part in self.split_special(text):
      ids.extend([part] if isinstance(part, int) else self.sp.encode(part))
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

  def build_example(self, question: str, answer: str, max_length: int) -> dict[str, np.ndarray]:
    """Training arrays for one sample, each [max_length] (docs/original.md sections 8, 11.5).

    tokens:         BOS + encode(question + ' ' + answer), truncated to max_length, pad 0; EOS
                    written at index n = (number of real tokens) when n < max_length.
    attention_mask: 1 on the n real tokens, 0 elsewhere (also 0 on the EOS, as the original).
    labels:         tokens, with -100 on pad (id 0), on ids >= V (figure and image ids) and on
                    the first len(BOS + encode(question)) positions; the EOS label is kept.
    loss_weights:   1.0 where labels != -100, else 0.0.
    """
    ids = self.encode(question + ' ' + answer)[:max_length]
    n = len(ids)
    tokens = np.zeros(max_length, np.int32)
    tokens[:n] = ids
    mask = np.zeros(max_length, np.int32)
    mask[:n] = 1
    if n < max_length:
      tokens[n] = EOS_ID
    labels = tokens.copy()
    labels[(tokens == PAD_ID) | (tokens >= self.vocab_size)] = IGNORE
    question_length = len(self.encode(question))
    labels[:question_length] = IGNORE
    return {'tokens': tokens, 'attention_mask': mask, 'labels': labels,
            'loss_weights': (labels != IGNORE).astype(np.float32)}

  def example_length(self, question: str, answer: str) -> int:
    """Positions a sample needs: real tokens + 1 for the EOS."""
    return len(self.encode(question + ' ' + answer)) + 1


def train_sentencepiece(lines: Iterable[str], out_path: str | None = None, vocab_size: int = 512,
                        model_type: str = 'bpe') -> bytes:
  """Trains a small SentencePiece model with LLaMA's conventions; returns (and writes) the proto.

  unk 0, bos 1, eos 2, no pad piece (pad shares id 0 as in RadFM), byte fallback, digits split.
  The image symbols are not added: the Tokenizer computes their ids past the vocabulary. vocab_size
  must exceed 256 (byte pieces) + 3 + the distinct characters of the corpus.
  """
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=True, split_digits=True, character_coverage=1.0,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2)
  proto = buf.getvalue()
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, 'wb') as f:
      f.write(proto)
  return proto


def image_ids(tokenizer: Tokenizer, image_index: int) -> Sequence[int]:
  """Ids of the num_latents placeholders of image `image_index`."""
  start = tokenizer.image_token_offset + image_index * tokenizer.num_latents
  return range(start, start + tokenizer.num_latents)
