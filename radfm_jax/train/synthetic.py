"""Synthetic RadFM batches for tests and benchmarks (`data.store=synthetic`).

Global batch `i` is a pure function of (seed, i): every process builds the same global batch and
keeps its own rows, so a run over N processes sees exactly the batches of a 1-process run with an
N-times larger per-host batch. The iterator state is `{'index': i}` (JSON), saved in checkpoints.

Each sample has the RadFM layout (docs/original.md sections 5, 7, 11.5): BOS, `<image>`, S*32 image
placeholder ids, `</image>`, a question, an answer, EOS (attention mask 0 there, as the pipeline
writes it), pad 0. Labels are the ids on the answer and the EOS, -100 elsewhere; loss weights are
1 or 3 on labelled positions (3 mimics the original's entity spans), 0 elsewhere.
"""

from __future__ import annotations

import numpy as np

from radfm_jax.config import Config
from radfm_jax.data.batch import IGNORE

BOS, EOS, PAD = 1, 2, 0


class SyntheticBatches:
  """Iterator of batch dicts (numpy, this process's rows) with `get_state` / `set_state`."""

  def __init__(self, cfg: Config, *, batch_size: int | None = None, seed: int | None = None,
               process_index: int = 0, process_count: int = 1, start: int = 0):
    m, d, t = cfg.model, cfg.data, cfg.train
    self.vocab = m.llama.vocab_size
    self.image_offset = m.image_token_offset
    self.latents = m.perceiver.num_latents
    self.per_host = batch_size or d.batch_size_2d
    self.process_index, self.process_count = process_index, process_count
    self.images = t.synthetic_images
    self.shape = (d.image_size_2d, d.image_size_2d, d.depth_buckets[0])
    self.length = t.synthetic_length or d.text_lengths[0]
    self.seed = cfg.seed if seed is None else seed
    self.index = start
    prefix = 3 + self.images * self.latents
    if self.length < prefix + 4:
      raise ValueError(f'synthetic text length {self.length} cannot hold {self.images} image(s) '
                       f'of {self.latents} tokens plus text: raise train.synthetic_length')

  @property
  def global_batch(self) -> int:
    return self.per_host * self.process_count

  def get_state(self) -> dict:
    return {'index': int(self.index)}

  def set_state(self, state: dict):
    self.index = int(state['index'])

  def __iter__(self):
    return self

  def make_global(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, index])
    b, s, length = self.global_batch, self.images, self.length
    images = rng.uniform(0.0, 1.0, (b, s, 3) + self.shape).astype(np.float32)
    tokens = np.zeros((b, length), np.int32)
    labels = np.full((b, length), IGNORE, np.int32)
    attention = np.zeros((b, length), np.int32)
    weights = np.zeros((b, length), np.float32)
    image_ids = [self.vocab] + list(self.image_offset + np.arange(s * self.latents)) + [
        self.vocab + 1]
    prefix = 1 + len(image_ids)
    for row in range(b):
      room = length - prefix - 1
      q = int(rng.integers(1, max(2, room // 2)))
      a = int(rng.integers(1, room - q + 1))
      text = rng.integers(3, self.vocab, q + a)
      seq = [BOS] + image_ids + list(text)
      n = len(seq)
      tokens[row, :n] = seq
      tokens[row, n] = EOS
      attention[row, :n] = 1
      labels[row, prefix + q:n + 1] = tokens[row, prefix + q:n + 1]
      w = np.where(rng.uniform(size=a + 1) < 0.2, 3.0, 1.0)
      weights[row, prefix + q:n + 1] = w
    return {'images': images, 'image_mask': np.ones((b, s), bool), 'tokens': tokens,
            'attention_mask': attention, 'labels': labels, 'loss_weights': weights}

  def __next__(self) -> dict:
    batch = self.make_global(self.index)
    self.index += 1
    lo = self.process_index * self.per_host
    return {k: v[lo:lo + self.per_host] for k, v in batch.items()}
