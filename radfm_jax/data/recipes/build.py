"""Row -> sample, one function per dataset family of the original RadFM (its
src/Dataset/dataset/*.py), written from their rules: which columns, how the question is built from
which prompt family, the answer text, and where each image goes.

Every builder takes (row, ctx) and returns a `Sample`; a row that cannot be one raises RowError.
The original draws prompts and placements with Python's global `random` at every `__getitem__`;
here `ctx.rng` is `random.Random(f'{seed}/{recipe}/{split}/{row}')` (recipes/__init__.py), so the
same file and seed always give the same records. Positions follow the original: `0` is the front
of the question, `len(question)` its "end" (before the last character, docs/data.md).

Prompt texts are data: recipes/prompts/*.json hold the original's prompt files and the MedPix
prompt tables (`ctx.prompts(name)`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.resources
import json
import os
import random
import re

from radfm_jax.data.recipes.files import Row, RowError, read_json_file
from radfm_jax.errors import InputError


@functools.lru_cache(maxsize=None)
def prompt_file(name: str) -> dict:
  """recipes/prompts/NAME.json: one of the original's prompt sets."""
  text = importlib.resources.files('radfm_jax.data.recipes').joinpath(
      f'prompts/{name}.json').read_text()
  return json.loads(text)


@dataclasses.dataclass
class Sample:
  question: str
  answer: str
  task: str
  images: list[dict]            # manifest image entries (path, position[, index])
  fields: dict = dataclasses.field(default_factory=dict)   # kind, yes_no, finding, ...


@dataclasses.dataclass
class Ctx:
  """What a builder needs besides its row."""
  rng: random.Random
  image_root: str
  source: str                   # the split file (side files lie beside it)
  prompts_name: str | None      # the recipe's prompt file (recipes/prompts/NAME.json)
  side: dict = dataclasses.field(default_factory=dict)   # side files read, shared by the rows

  def prompts(self, key: str = 'caption_prompt') -> list[str]:
    return prompt_file(self.prompts_name)[key]

  def resolve(self, path: str) -> str:
    """A path named by a split file: relative ones start at the image root."""
    return os.path.normpath(os.path.join(self.image_root, path))

  def image(self, field: str, path: str) -> str:
    """The resolved path of an image the row names, which must exist (RowError otherwise)."""
    full = self.resolve(path)
    if os.path.isdir(full):
      raise RowError(field, f'{full} is a folder; expected an image file under --image-root '
                     f'{self.image_root} (or an absolute path)')
    if not os.path.isfile(full):
      raise RowError(field, f'image not found: {full}; expected the file under --image-root '
                     f'{self.image_root} (or an absolute path)')
    return full

  def side_file(self, name: str, what: str):
    """A JSON file beside the split file (read once per run)."""
    path = os.path.join(os.path.dirname(os.path.abspath(self.source)), name)
    if path not in self.side:
      self.side[path] = read_json_file(path, what)
    return self.side[path]

  def ends(self, question: str) -> int:
    """The original's coin: the front (0) or the end (len(question)) of the question."""
    return 0 if self.rng.random() < 0.5 else len(question)


def _one(path: str, position: int, field='question') -> list[dict]:
  return [{'path': path, 'position': {field: position}}]


def _closed(fields: dict | None = None) -> dict:
  return {'kind': 'closed', **(fields or {})}


# ------------------------------------------------------------------------------------------------
# 2D families


def yes_no(row: Row, ctx: Ctx) -> Sample:
  """binary.py Binary_Dataset: columns image_path, disease, label (0/1)."""
  path = ctx.image('image_path', row.text('image_path'))
  disease, label = row.text('disease'), row.text('label')
  try:
    value = float(label)
  except ValueError:
    value = None
  if value not in (0.0, 1.0):
    raise RowError('label', f'got {label!r}; expected 0 or 1')
  question = ctx.rng.choice(ctx.prompts()).replace('disease', disease)
  return Sample(question, 'yes' if value else 'no', 'diagnosis_yes_no',
                _one(path, len(question)), _closed({'finding': disease}))


def labelled(task: str):
  """chestxray.py ChestXray_Dataset: columns image_path, label (the answer text: a diagnosis list
  or, for MIMIC, the report); the image before the question's last character."""
  def build(row: Row, ctx: Ctx) -> Sample:
    path = ctx.image('image_path', row.text('image_path'))
    question = ctx.rng.choice(ctx.prompts())
    return Sample(question, row.text('label'), task, _one(path, len(question)))
  build.__doc__ = labelled.__doc__
  return build


def vqa(row: Row, ctx: Ctx) -> Sample:
  """vqa.py VQA_Dataset: columns img_root_dir, Figure_path, Question, Answer."""
  rel = os.path.join(row.text('img_root_dir', empty_ok=True), row.text('Figure_path'))
  path = ctx.image('Figure_path', rel)
  question = row.text('Question')
  return Sample(question, row.text('Answer'), 'vqa', _one(path, ctx.ends(question)))


def pmcoa(row: Row, ctx: Ctx) -> Sample:
  """pmcoa.py PMCOA_Dataset: columns Figure_path, Caption; a caption prompt."""
  path = ctx.image('Figure_path', row.text('Figure_path'))
  question = ctx.rng.choice(ctx.prompts())
  return Sample(question, row.text('Caption'), 'report', _one(path, ctx.ends(question)))


def case_report(row: Row, ctx: Ctx) -> Sample:
  """case_report.py CaseReport_dataset: columns PMC_id, img_ref (a Python list literal of figure
  ids: image ROOT/{PMC_id}_{id}.jpg), context, question, answer."""
  pmc_id, refs = row.text('PMC_id'), row.text('img_ref')
  try:
    ids = ast.literal_eval(refs)
  except (ValueError, SyntaxError):
    ids = None
  if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
    raise RowError('img_ref', f'got {refs[:60]!r}; expected a list of figure ids such as '
                   "['F1', 'F2']")
  context = row.text('context')
  sentences = context.split('.')
  if len(sentences) > 5:                 # the first sentence and the last four
    context = sentences[0] + '. ' + '. '.join(sentences[-4:])
  question = context + '\n' + row.text('question').replace('Q:', '')
  answer = row.text('answer').replace('A:', '')
  images = []
  for i in ids:
    path = ctx.image('img_ref', f'{pmc_id}_{i}.jpg')
    at = len(question) if ctx.rng.random() > 0.5 else len(context)
    images += _one(path, at)
  return Sample(question, answer, 'vqa', images)


def medpix_qa(row: Row, ctx: Ctx) -> Sample:
  """MedPix_dataset.py MedPix_QA_Dataset: columns name, question, answer, explanation (optional:
  appended as 'answer. explanation')."""
  path = ctx.image('name', row.text('name'))
  question, answer = row.text('question'), row.text('answer')
  explanation = row.text('explanation', empty_ok=True)
  if explanation:
    answer = answer + '. ' + explanation
  at = len(question) if ctx.rng.random() > 0.5 else 0
  return Sample(question, answer, 'vqa', _one(path, at))


_SINGLE_TASKS = {'modality': 'modality', 'plane': 'vqa', 'caption': 'report'}


def medpix_single(row: Row, ctx: Ctx) -> Sample:
  """MedPix_dataset.py MedPix_Single_Dataset: columns name, context (the answer), type (modality,
  plane or caption). Modality and plane questions are open or, with p = 0.5, yes/no about the
  true value or another one of the original's candidate list."""
  table = prompt_file('medpix_single')
  kind, answer = row.text('type'), row.text('context')
  if kind not in table['prompts'] or kind.endswith('_yes_no'):
    raise RowError('type', f'got {kind!r}; expected one of {", ".join(_SINGLE_TASKS)}')
  fields = {}
  if kind in ('modality', 'plane') and not ctx.rng.random() > 0.5:
    template = ctx.rng.choice(table['prompts'][kind + '_yes_no'])
    if ctx.rng.random() > 0.5:
      named, answer = answer, 'yes'
    else:
      named = ctx.rng.choice([c for c in table['candidates'][kind] if c != answer])
      answer = 'no'
    question = template.format(object=named)
    fields = _closed({'yes_no': True, 'modality': named} if kind == 'modality' else None)
  else:
    question = ctx.rng.choice(table['prompts'][kind])
  path = ctx.image('name', row.text('name'))
  at = len(question) if ctx.rng.random() > 0.5 else 0
  return Sample(question, answer, _SINGLE_TASKS[kind], _one(path, at), fields)


_MULTI_TASKS = {'ddx': 'diagnosis_open', 'diagnosis': 'diagnosis_open', 'findings': 'report',
                'exam': 'report', 'discussion': 'rationale', 'dxHow': 'vqa', 'txFollowup': 'vqa'}
_MEASUREMENT = re.compile(r'\d+(\.\d+)?\s*(mm|cm|x\d+\s*cm)')


def medpix_multi(row: Row, ctx: Ctx) -> Sample:
  """MedPix_dataset.py MedPix_Multi_Dataset: columns name (comma-separated image files), context
  (the answer, '• ' removed; findings lose their measurements), type (the prompt family), history
  (optional, put before the question with p = 0.5). All images at one end; at most 10."""
  kind = row.text('type')
  if kind not in _MULTI_TASKS:
    raise RowError('type', f'got {kind!r}; expected one of {", ".join(_MULTI_TASKS)}')
  answer = row.text('context').replace('• ', '')
  question = ctx.rng.choice(prompt_file('medpix_multi')['prompts'][kind])
  history = row.text('history', empty_ok=True)
  if history and ctx.rng.random() > 0.5:
    question = history + ' ' + question
  names = [n.strip() for n in row.text('name').split(',') if n.strip()]
  if not names:
    raise RowError('name', f'got {row.text("name")!r}; expected comma-separated image file names')
  at = len(question) if ctx.rng.random() > 0.5 else 0
  if kind == 'findings':
    answer = _MEASUREMENT.sub('', answer)
  if len(names) > 10:                    # the original keeps 10 drawn at random
    names = [names[i] for i in sorted(ctx.rng.sample(range(len(names)), 10))]
  images = [im for n in names for im in _one(ctx.image('name', n), at)]
  return Sample(question, answer, _MULTI_TASKS[kind], images)


def paper_inline(row: Row, ctx: Ctx, window: int = 50, max_images: int = 3) -> Sample:
  """paper_inline.py Paper_Inline_dataset: column PMC_path, a JSON file of the paper's sentences
  [{"text": ..., "img_ref": [figure ids]}]; figures ROOT/{PMC name}_{id}.jpg. A window of 50
  sentences (at random, or with p = 0.5 starting 10 before a sentence that cites a figure), at
  most 3 figures, each placed in the answer where it is cited; the question is empty."""
  rel = row.text('PMC_path')
  paper = ctx.resolve(rel)
  from radfm_jax.data.store import loads_unique
  try:
    with open(paper, encoding='utf-8') as f:
      sentences = loads_unique(f.read(), paper)
  except InputError as e:                 # a key twice in one object: the first value lost
    raise RowError('PMC_path', e.args[0]) from None
  except (OSError, ValueError) as e:
    raise RowError('PMC_path', f'cannot read {paper} ({type(e).__name__}: {e}); expected a JSON '
                   'list of sentences') from None
  if not isinstance(sentences, list) or not all(
      isinstance(s, dict) and isinstance(s.get('text'), str) and isinstance(s.get('img_ref'), list)
      for s in sentences):
    raise RowError('PMC_path', f'{paper}: expected a JSON list of {{"text": str, "img_ref": '
                   '[ids]}')
  name = rel.rsplit('/', 2)[-1].split('.')[0]
  n = len(sentences)
  if n > window:
    # one entry per citing sentence, as in the original (a start cited twice is drawn twice as
    # often)
    starts = [min(max(i - 10, 0), n - window) for i, s in enumerate(sentences) if s['img_ref']]
    if ctx.rng.random() >= 0.5 or not starts:
      start = ctx.rng.randint(0, n - window)
    else:
      start = ctx.rng.choice(starts)
    sentences = sentences[start:start + window]
  text, images = '', []
  for s in sentences:
    if s['img_ref']:
      if len(images) + len(s['img_ref']) > max_images:
        break
      for i in s['img_ref']:
        images += _one(ctx.image('PMC_path', f'{name}_{i}.jpg'), len(text), 'answer')
    text += s['text']
  return Sample('', text, 'interleaved', images)


# ------------------------------------------------------------------------------------------------
# 3D families (Radiopaedia): one .npy per case [S, C, H, W, D], image s = case[s]


def _case_images(ctx: Ctx, field: str, rel: str, question: str) -> list[dict]:
  """One image entry per image of a case .npy, each at its own coin's end of the question (the
  original's RadioVQA / RadioCaption / Radiofeatures rule). A case of 0 images is a RowError: the
  sample would ask about images it has none of."""
  from radfm_jax.data.readers import npy_header
  path = ctx.image(field, rel)
  try:
    shape = npy_header(path)[0]
  except Exception as e:  # numpy raises several types for a bad header
    raise RowError(field, f'{path}: not a readable .npy ({type(e).__name__}: {e}); expected a '
                   'RadFM case [S, C, H, W, D]') from None
  if len(shape) != 5:
    return _one(path, ctx.ends(question))
  if shape[0] == 0:
    raise RowError(field, f'{path}: the case [S, C, H, W, D] {list(shape)} holds no images; '
                   'expected at least one')
  return [{'path': path, 'index': s, 'position': {'question': ctx.ends(question)}}
          for s in range(shape[0])]


def radio_vqa(row: Row, ctx: Ctx) -> Sample:
  """radiopaedia.py RadioVQA_Dataset: columns image_path (a case .npy), question, answer."""
  question = row.text('question')
  images = _case_images(ctx, 'image_path', row.text('image_path'), question)
  return Sample(question, row.text('answer'), 'vqa', images)


def radio_modality(row: Row, ctx: Ctx) -> Sample:
  """radiopaedia.py Radio_Modality_Dataset: columns image_path (a NIfTI volume), answer (its
  modality). Open with p = 0.5, else yes/no about the true modality or another one of
  modality_set.json (beside the split file)."""
  path = ctx.image('image_path', row.text('image_path'))
  modality = row.text('answer')
  fields = {}
  if ctx.rng.random() < 0.5:
    question, answer = ctx.rng.choice(ctx.prompts('caption_prompt')), modality
  else:
    named, answer = modality, 'yes'
    if ctx.rng.random() >= 0.5:
      others = [m for m in _modality_set(ctx) if m != modality]
      if not others:
        raise RowError('answer', f'{modality!r} is the only modality of modality_set.json; '
                       'expected another one to ask a "no" question about')
      named, answer = ctx.rng.choice(others), 'no'
    question = ctx.rng.choice(ctx.prompts('modality_prompt')).replace('modality', named)
    fields = _closed({'yes_no': True, 'modality': named})
  return Sample(question, answer, 'modality', _one(path, ctx.ends(question)), fields)


def _modality_set(ctx: Ctx) -> list[str]:
  data = ctx.side_file('modality_set.json', 'the RadFM modality list {"modality": [...]} beside '
                       'the split file (the "no" questions name one of them)')
  path = os.path.join(os.path.dirname(os.path.abspath(ctx.source)), 'modality_set.json')
  if not isinstance(data, dict) or not isinstance(data.get('modality'), list):
    raise InputError(f'{path}: got {json.dumps(data)[:60]}; expected {{"modality": [names]}}')
  for i, m in enumerate(data['modality']):
    if not isinstance(m, str) or not m.strip():   # was: str(m), a question about "None"
      raise InputError(f'{path} field modality[{i}]: got {json.dumps(m)[:60]}; expected a '
                       'modality name (a non-empty string)')
  return data['modality']


def _patient(row: Row) -> str:
  return row.text('pat', empty_ok=True) + ' ' + row.text('pre', empty_ok=True)


def radio_caption(row: Row, ctx: Ctx) -> Sample:
  """radiopaedia.py RadioCaption_Dataset: keys pat, pre (patient and history, before the prompt),
  npy_path, finding, impression (answer 'Finding: {finding}Impression: {impression}')."""
  finding = row.text('finding', empty_ok=True)
  impression = row.text('impression', empty_ok=True)
  question = _patient(row) + ' ' + ctx.rng.choice(ctx.prompts())
  images = _case_images(ctx, 'npy_path', row.text('npy_path'), question)
  return Sample(question, f'Finding: {finding}Impression: {impression}', 'report', images,
                {'findings': finding, 'impression': impression})


def _text_list(row: Row, key: str) -> list[str]:
  value = row.values.get(key)
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise RowError(key, f'got {json.dumps(value)[:60]}; expected a list of strings')
  return value


def _article_titles(ctx: Ctx) -> dict:
  """articles_resave.json (beside the split file), keyed by article title, or an InputError naming
  it: a file that is not a JSON object keyed by title (or holds none) is the whole recipe's
  problem, not one of the rows that happen to draw a "no" question."""
  data = ctx.side_file('articles_resave.json', 'the RadFM article titles {"title": ...} beside '
                       'the split file (the "no" questions name one of them)')
  if not isinstance(data, dict) or not data:
    path = os.path.join(os.path.dirname(os.path.abspath(ctx.source)), 'articles_resave.json')
    raise InputError(f'{path}: got {json.dumps(data)[:60]}; expected a JSON object keyed by '
                     'article title ({"title": ...})')
  return data


def radio_features(row: Row, ctx: Ctx) -> Sample:
  """radiopaedia.py Radiofeatures_Dataset: keys pat, pre, npy_path, title (the diagnosis),
  articles and radiographic_features (lists of text). With p = 0.5 the rationale question (answer:
  the article text + the original's lead-in + the features), else yes/no about the title or
  another article title of articles_resave.json (beside the split file)."""
  _article_titles(ctx)       # read and checked at the first row, whichever questions it draws
  title = row.text('title')
  features = ' '.join(_text_list(row, 'radiographic_features'))
  articles = ' '.join(_text_list(row, 'articles'))
  if ctx.rng.random() < 0.5:
    question = _patient(row) + ' ' + ctx.rng.choice(ctx.prompts())
    answer = articles + 'The Radiographic features can be summarized as follows.' + features
    task, fields = 'rationale', {'diagnosis': title}
  else:
    named, answer = title, 'yes'
    if ctx.rng.random() >= 0.5:
      others = [t for t in _article_titles(ctx) if t != title]
      if not others:
        raise RowError('title', 'articles_resave.json names no other article; expected a JSON '
                       'object keyed by article title')
      named, answer = ctx.rng.choice(others), 'no'
    question = ctx.rng.choice(prompt_file('yes_no')['caption_prompt']).replace('disease', named)
    task, fields = 'diagnosis_yes_no', _closed({'finding': named})
  images = _case_images(ctx, 'npy_path', row.text('npy_path'), question)
  return Sample(question, answer, task, images, fields)
