"""Task prompts (templates/*.json) and RadFM image placement in text.

Image i of a sample is written in text as

    <image><image{n*i}><image{n*i+1}>...<image{n*i+n-1}></image>        (n = perceiver latents)

and inserted before character index max(pos - 1, 0) of the question or the answer, as the manifest
says: `{"question": pos}` or `{"answer": pos}` (docs/data.md, with examples; the original's rule,
docs/original.md section 11.5: pos = 0 is the front, pos = len(text) lands before the last
character, larger is the end). Image numbering is the manifest order, so
the tokens of image i always select `images[b, i]` in the model, whatever the text order; blocks
inserted at the same character keep manifest order.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import random
import re
import zlib
from typing import Sequence

TASKS = ('modality', 'diagnosis_yes_no', 'diagnosis_open', 'vqa', 'report', 'rationale')


@functools.lru_cache(maxsize=None)
def load_templates(task: str) -> dict:
  """The template file of one task family: {'task', 'questions', ...}."""
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}: expected one of {TASKS}')
  text = importlib.resources.files('radfm_jax.data').joinpath(f'templates/{task}.json').read_text()
  return json.loads(text)


def render_question(task: str, rng: random.Random | None = None, yes_no: bool = False,
                    **fields) -> str:
  """A question of `task` with its fields filled (`yes_no` picks the modality yes/no set)."""
  templates = load_templates(task)
  pool = templates['yes_no_questions' if yes_no else 'questions']
  template = (rng or random.Random(0)).choice(pool)
  try:
    return template.format(**fields)
  except KeyError as e:
    raise ValueError(f'task {task!r} template {template!r} needs field {e}') from e


# What the tokenizer reads as image tokens (data/tokenizer.py: `<image>`, `</image>`, `<imageK>`):
# never plain text of a sample, whose images go where their positions say.
IMAGE_TOKEN = re.compile(r'</?image>|<image(?:0|[1-9][0-9]*)>')


def image_token_in(text: str) -> str | None:
  """The first image token written in `text` as plain text, else None."""
  found = IMAGE_TOKEN.search(text)
  return found.group(0) if found else None


def image_block(i: int, num_latents: int = 32) -> str:
  """`<image>` + the num_latents placeholders of image i + `</image>`."""
  start = i * num_latents
  return '<image>' + ''.join(f'<image{k}>' for k in range(start, start + num_latents)) + '</image>'


def insert_images(text: str, positions: Sequence[tuple[int, int]], num_latents: int = 32) -> str:
  """Inserts image blocks into `text`; positions are (image index, manifest char position)."""
  # Stable sort by insertion point keeps manifest order for equal points.
  points = sorted(((min(max(pos - 1, 0), len(text)), i) for i, pos in positions),
                  key=lambda p: p[0])
  out, last = [], 0
  for at, i in points:
    out.append(text[last:at])
    out.append(image_block(i, num_latents))
    last = at
  out.append(text[last:])
  return ''.join(out)


def place_images(question: str, answer: str, positions: Sequence[dict],
                 num_latents: int = 32) -> tuple[str, str]:
  """positions[i] = {'question': pos} or {'answer': pos} for image i -> (question, answer)."""
  in_q, in_a = [], []
  for i, pos in enumerate(positions):
    if len(pos) != 1 or next(iter(pos)) not in ('question', 'answer'):
      raise ValueError(f'image {i} position {pos!r}: expected {{"question"|"answer": index}}')
    field, value = next(iter(pos.items()))
    (in_q if field == 'question' else in_a).append((i, int(value)))
  return insert_images(question, in_q, num_latents), insert_images(answer, in_a, num_latents)


def sample_rng(sample_id) -> random.Random:
  """A template picker seeded by the sample id, so a sample always gets the same wording."""
  return random.Random(zlib.crc32(str(sample_id).encode()))


def format_sample(record: dict, num_latents: int = 32,
                  max_images: int | None = None) -> tuple[str, str, int]:
  """Manifest record -> (question with image blocks, answer with image blocks, image count).

  A record without a question gets one rendered from its task's templates (fields come from the
  record). Images beyond `max_images` are dropped with their text blocks, as the original does.
  Bullets '•' are removed from the answer after the images are placed, as the original's
  `text_add_image` does: an answer position counts the characters of the answer as given.
  """
  question = str(record.get('question') or '')
  answer = str(record.get('answer') or '')
  if not question and record.get('task') in TASKS:
    fields = {k: v for k, v in record.items() if k not in ('task', 'rng', 'yes_no')}
    question = render_question(record['task'], sample_rng(record.get('id')),
                               yes_no=bool(record.get('yes_no')), **fields)
  if not answer.replace('•', '') and record.get('task') == 'report' and 'findings' in record:
    answer = load_templates('report')['answer_format'].format(
        findings=record['findings'], impression=record.get('impression', ''))
  images = list(record.get('images', []))
  if max_images is not None:
    images = images[:max_images]
  question, answer = place_images(question, answer, [im.get('position', {'question': 0})
                                                     for im in images], num_latents)
  return question, answer.replace('•', ''), len(images)
