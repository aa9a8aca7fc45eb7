"""The sample manifest: its schema (one table), validation, and reading (JSONL or a TFDS directory).

    records = read_records('samples.jsonl', form='input')          # what `radfm-jax ingest` reads
    records = read_manifest('STORE/manifest.jsonl', split='train')  # what training reads
    records = read_manifest('DIR/radfm_samples/1.0.0')             # every split, in order

`SAMPLE_FIELDS` and `IMAGE_FIELDS` are the one description of a manifest line: the validator
checks every line against them, `radfm-jax ingest --help` prints them (`schema_help`) and
docs/data.md holds them as a table (`schema_markdown`; a test keeps the doc equal to it).

Two forms share the schema. An *input* manifest (written by the user, read by ingest, eval and
`radfm-jax tokenizer train`) names each scan by `path`; a *store* manifest (STORE/manifest.jsonl,
written by ingest, read by training) names it by the stored scan `id` and its `shape`.

Unknown fields. An image entry takes only the fields of `IMAGE_FIELDS`. A sample may carry fields
of its own (kept unchanged through ingest and publish, usable by task templates): that is the
extension point. A name that is a near-miss of a known field (`qestion`, `image`, `Answer`) is an
error with a did-you-mean, and so is an image field (`path`, `position`, ...) outside `images`,
since either would otherwise be silently ignored.

Errors are `InputError`s, one line: `samples.jsonl line 3 field images[1].position: got
{"questin": 4}; expected {"question": N} or {"answer": N}, N an integer >= 0`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import string
import textwrap
from typing import Any, Callable, Iterable

from radfm_jax.data.prompts import TASKS, image_token_in, load_templates
from radfm_jax.errors import InputError, not_text, where

FORMS = ('input', 'store')
# The group of the records without a `task` (eval tables) or without a `dataset` (eval tables,
# data.mixture, the training metrics' share/ and drawn/): `check_default_groups` keeps a task or
# dataset of that very name from being merged with them.
DEFAULT_GROUP = 'default'
DEFAULT_DATASET = DEFAULT_GROUP


def dataset_of(record: dict) -> str:
  """The record's `dataset` (recipes set it), or DEFAULT_DATASET."""
  return str(record.get('dataset') or DEFAULT_DATASET)


def check_default_groups(numbered: Iterable[tuple[int, dict]],
                         place: Callable[[int, str | None], str],
                         fields: tuple[str, ...] = ('task', 'dataset')) -> None:
  """InputError when the records hold both a `task` (or `dataset`) named DEFAULT_GROUP and a
  record without one ("" counts as none): the records without one are grouped under that name,
  so the two would silently be scored, weighted and counted as one group. Refused rather than
  renamed: either side is the user's to rename, and a table key or mixture weight name the user
  never wrote would be a surprise. `place(line, field)` words the where, as for `check_records`."""
  numbered = list(numbered)
  for field in fields:
    named = next((n for n, r in numbered if r.get(field) == DEFAULT_GROUP), None)
    without = next((n for n, r in numbered if not r.get(field)), None)
    if named is not None and without is not None:
      raise InputError(f'{place(named, field)}: {_shown(DEFAULT_GROUP)} is also the name of the '
                       f'group of samples without a {field} (e.g. {place(without, None)}), so the '
                       f'two would be counted as one; expected another {field} name, or a {field} '
                       'on every sample')


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of a manifest line, as validated and as documented."""
  name: str
  type: str                          # what the value must be, in words (also the 'expected')
  default: str                       # in words; 'required' when the field must be given
  meaning: str
  check: Callable[[Any], bool]
  forms: tuple[str, ...] = FORMS     # where it may appear ('input', 'store')


def _str(v):
  return isinstance(v, str)


def _int(v, low=0):
  return isinstance(v, int) and not isinstance(v, bool) and v >= low


# The largest `frame` / `index`: far above any real count (a NIfTI-1 dimension is an int16), and
# it keeps the value an int32 wherever it goes (the scan's source_key attribute, TensorStore's
# JSON), so a huge one is a schema error here rather than an overflow in the store write.
MAX_PICK = 2**31 - 1


def _pick(v):
  return _int(v) and v <= MAX_PICK


def _str_list(v):
  return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _position(v):
  return (isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ('question', 'answer')
          and _int(next(iter(v.values()))))


def _split_name(v):
  # (TFDS, which `publish` writes, refuses a split name of underscores alone)
  return isinstance(v, str) and re.fullmatch(r'\w*[A-Za-z0-9]\w*', v, re.ASCII) is not None


SAMPLE_FIELDS = (
    Field('id', 'string or integer', 'the record\'s number, 0 for the first, as a string',
          'sample id, unique in the file; names the sample in rejects, predictions and errors',
          lambda v: (_str(v) and v != '') or _int(v)),
    Field('question', 'string', '""',
          'the prompt text; when empty, one of the task\'s template questions (picked by id)',
          _str),
    Field('answer', 'string', '""', 'the target text the model learns to write (the reference in '
          'eval); "•" bullets are removed', _str),
    Field('task', 'string', '""',
          f'task family: one of {", ".join(TASKS)} renders an empty question from templates; '
          'any value groups the eval scores', _str),
    Field('dataset', 'string', '""',
          'the dataset the sample comes from (recipes set it): groups eval scores and picks the '
          'training mixture\'s weight', _str),
    Field('split', 'string of letters, digits, _ (not _ alone)', '"train"',
          'which split the sample belongs to: training reads "train", periodic eval "eval", '
          '`radfm-jax publish` makes one TFDS split per value', _split_name),
    Field('images', 'list of image objects (below)', '[]',
          'the scans of the sample, in order: image i becomes the i-th image of the model input',
          lambda v: isinstance(v, list)),
    Field('kind', '"closed" or "open"', 'guessed by eval',
          'eval scoring: closed = exact match (yes/no, option letter), open = BLEU/ROUGE/F1',
          lambda v: v in ('closed', 'open')),
    Field('yes_no', 'boolean', 'false',
          'task modality: use its yes/no templates ("Is this a {modality} scan?"); eval: closed',
          lambda v: isinstance(v, bool)),
    Field('options', 'list of strings', 'none', 'answer options of a multiple-choice question '
          '(eval scores the sample as closed)', _str_list),
    Field('choices', 'list of strings', 'none', 'the same as options', _str_list),
    Field('finding', 'string', 'none', 'template field of task diagnosis_yes_no ("Does this image '
          'show {finding}?")', _str),
    Field('diagnosis', 'string', 'none', 'template field of task rationale', _str),
    Field('modality', 'string', 'none', 'template field of task modality with yes_no (the image '
          'modality is images[].modality)', _str),
    Field('findings', 'string', 'none', 'task report with an empty answer: the answer becomes '
          '"Findings: {findings} Impression: {impression}"', _str),
    Field('impression', 'string', '""', 'see findings', _str),
)

IMAGE_FIELDS = (
    Field('images[].path', 'non-empty string', 'required (input form)',
          'scan file (.nii/.nii.gz, .dcm, .png, .jpg/.jpeg, .npy) or a folder holding one DICOM '
          'series; relative paths start at the manifest\'s folder (or ingest --root)',
          lambda v: _str(v) and v != '', forms=('input',)),
    Field('images[].id', 'non-empty string', 'a hash of path, frame and index; required in the '
          'store form',
          'scan id in the store; entries with the same id share one stored scan',
          lambda v: _str(v) and v != ''),
    Field('images[].modality', 'string', '"" (DICOM: its Modality tag)',
          'e.g. "CT", "MRI", "X-ray"; under a CT intensity policy (data.intensity) "CT" images '
          'get the CT windows, the others min-max scaling',
          _str),
    Field('images[].position', '{"question": N} or {"answer": N}, N an integer >= 0',
          '{"question": 0}', 'which text the image\'s tokens go in, and where: after its first N-1 '
          'characters (0 and 1: at the front; len(text): before the last character, e.g. a final '
          '"?"; more: at the end)',
          _position),
    Field('images[].frame', 'integer >= 0 and < 2^31', 'none',
          'which volume of a 4D NIfTI (time or echo axis); required for one with > 1 frames; any '
          'other scan is one volume, so only 0 (any other value: the scan is rejected)',
          _pick, forms=('input',)),
    Field('images[].index', 'integer >= 0 and < 2^31', 'all images',
          'which image of a 5D RadFM case .npy [S, C, H, W, D]; any other scan is one image, so '
          'only 0 (any other value: the scan is rejected)', _pick, forms=('input',)),
    Field('images[].shape', 'list of 4 integers >= 1', 'required (store form)',
          'stored shape [C, H, W, D], written by ingest',
          lambda v: isinstance(v, list) and len(v) == 4 and all(_int(x, 1) for x in v),
          forms=('store',)),
)

_SAMPLE = {f.name: f for f in SAMPLE_FIELDS}
_IMAGE = {f.name.split('.', 1)[1]: f for f in IMAGE_FIELDS}


class FieldError(ValueError):
  """A record's field is wrong: `field` (e.g. images[1].position; None: the whole line) and the
  problem."""

  def __init__(self, field: str | None, problem: str):
    super().__init__(f'field {field}: {problem}' if field else problem)
    self.field, self.problem = field, problem


def _shown(value) -> str:
  text = json.dumps(value, ensure_ascii=False)
  return text if len(text) <= 60 else text[:57] + '...'


def _unknown(name: str, known: Iterable[str]) -> str | None:
  """The known field `name` looks like a misspelling of, else None."""
  lower = {k.lower(): k for k in known}
  if name.lower() in lower:
    return lower[name.lower()]
  match = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.8)
  return lower[match[0]] if match else None


def _check(field: Field, label: str, value):
  if not field.check(value):
    raise FieldError(label, f'got {_shown(value)}; expected {field.type}')


def check_image_field(key: str, value) -> None:
  """FieldError (field `key`) unless `value` fits the image field `key` of IMAGE_FIELDS: for files
  that take some of the image fields (a `generate` prompts file: path, modality, frame, index)."""
  _check(_IMAGE[key], key, value)


def _template_fields(task: str, yes_no: bool) -> list[str]:
  """Names the templates of `task` fill in ({finding}, ...), in order."""
  t = load_templates(task)
  pool = t['yes_no_questions' if yes_no and 'yes_no_questions' in t else 'questions']
  names = []
  for template in pool:
    for _, name, _, _ in string.Formatter().parse(template):
      if name and name not in names:
        names.append(name)
  return names


def validate_image(entry, i: int, form: str | None) -> None:
  """Checks images[i] of a record; `form` None: 'store' for an entry with a shape and no path,
  else 'input'."""
  label = f'images[{i}]'
  if not isinstance(entry, dict):
    raise FieldError(label, f'got {_shown(entry)}; expected an object {{"path": ...}}')
  form = form or ('store' if 'shape' in entry and 'path' not in entry else 'input')
  allowed = [k for k, f in _IMAGE.items() if form in f.forms]
  for key, value in entry.items():
    if key not in allowed:
      near = _unknown(key, allowed)
      hint = f' (did you mean {near}?)' if near and near != key else ''
      what = ('not read from ' + ('an input' if form == 'input' else 'a store') + ' manifest'
              if key in _IMAGE else 'unknown field')
      raise FieldError(f'{label}.{key}', f'{what}{hint}; expected one of {", ".join(allowed)}')
    _check(_IMAGE[key], f'{label}.{key}', value)
  required = ('path',) if form == 'input' else ('id', 'shape')
  for key in required:
    if key not in entry:
      how = ('an input manifest names each scan by its path' if form == 'input' else
             'a store manifest names each scan by id and shape, as ingest writes them')
      raise FieldError(f'{label}.{key}', f'missing; expected {_IMAGE[key].type} ({how})')


def validate_record(record, form: str | None = None) -> None:
  """Checks one manifest record against the schema; raises FieldError naming the field.

  form: 'input' (images by path), 'store' (images by id and shape) or None (either, per entry).
  """
  if form not in (None,) + FORMS:
    raise ValueError(f'form {form!r}: expected one of {FORMS} or None')
  if not isinstance(record, dict):
    raise FieldError(None, f'got {_shown(record)}; expected a JSON object {{"question": ...}}')
  found = not_text(record)      # any field, the user's own too: ingest keeps them all
  if found is not None:
    raise FieldError(*found)
  for key, value in record.items():
    field = _SAMPLE.get(key)
    if field is None and key in _IMAGE:            # e.g. "path" next to "question"
      raise FieldError(key, f'a field of an image entry; expected it inside "images": '
                       f'[{{"{key}": ...}}]')
    if field is None:
      near = _unknown(key, _SAMPLE)
      if near is not None:
        raise FieldError(key, f'unknown field (did you mean {near}?); expected a known field, or '
                         'a field of your own whose name is not a near-miss of one')
      continue                                     # a field of the user's own: kept as is
    _check(field, key, value)
  for key in ('question', 'answer'):
    token = image_token_in(record.get(key) or '')
    if token is not None:
      raise FieldError(key, f'holds {token!r}, which the tokenizer reads as an image token; '
                       'expected plain text (an image goes where its images[k].position says)')
  for i, entry in enumerate(record.get('images', [])):
    validate_image(entry, i, form)
  task = record.get('task')
  if not record.get('question') and task in TASKS:
    for name in _template_fields(task, bool(record.get('yes_no'))):
      if name == 'question':
        raise FieldError(name, f'empty; expected the question text (task {task} has no template '
                         'questions)')
      if name not in record:
        raise FieldError(name, f'missing; expected {_SAMPLE[name].type} (the question is empty, '
                         f'so it comes from the templates of task {task}, which use {{{name}}})')


def check_records(records: Iterable[tuple[int, Any]], place: Callable[[int, str | None], str],
                  form: str | None) -> list[dict]:
  """Validates (line number, record) pairs; ids must be unique, and a task or dataset named
  DEFAULT_GROUP may not meet records without one (`check_default_groups`). `place(line, field)`
  words the where of an error (`errors.where` for a file)."""
  out, seen, scans, lines = [], {}, {}, []
  for line, record in records:
    try:
      validate_record(record, form)
    except FieldError as e:
      raise InputError(f'{place(line, e.field)}: {e.problem}') from None
    key = str(record['id']) if 'id' in record else str(len(out))     # ingest's default id
    if key in seen:
      how = '' if 'id' in record else ' (its default id: the record number, from 0)'
      raise InputError(f'{place(line, "id")}: {_shown(key)}{how} is already used '
                       f'({place(seen[key], None)}); expected a unique id')
    seen[key] = line
    for i, entry in enumerate(record.get('images', [])):
      if 'id' in entry and 'path' in entry:          # one stored scan per image id
        scan = (entry['path'], entry.get('frame'), entry.get('index'))
        first = scans.setdefault(entry['id'], (scan, line))
        if first[0] != scan:
          raise InputError(f'{place(line, f"images[{i}].id")}: {_shown(entry["id"])} already names '
                           f'{_shown(first[0][0])} ({place(first[1], None)}); expected one id '
                           'per scan (path, frame, index)')
    out.append(record)
    lines.append(line)
  check_default_groups(zip(lines, out), place)
  return out


def read_records(path: str, form: str | None = 'store') -> list[dict]:
  """Every record of a manifest JSONL file, validated (see `validate_record` for `form`)."""
  from radfm_jax.data.store import exists, is_url, iter_jsonl   # here: --help imports no TensorStore
  path = os.fspath(path)
  if not (exists(path) if is_url(path) else os.path.isfile(path)):
    raise InputError(f'manifest {path}: no such file (expected a JSONL file, one sample per line)')
  return check_records(iter_jsonl(path), lambda line, field: where(path, line, field), form)


def record_place(n: int, field: str | None = None) -> str:
  """Where an in-memory record is, for messages: 'manifest record N [field F]' (N from 1)."""
  return f'manifest record {n}' + (f' field {field}' if field else '')


def validate_records(records: Iterable[dict], form: str | None = 'input') -> list[dict]:
  """In-memory records (e.g. passed to `ingest`), validated; errors say `manifest record N`
  (1-based)."""
  return check_records(enumerate(records, 1), record_place, form)


def read_manifest(path: str, split: str | None = None) -> list[dict]:
  """The sample rows of a store-form manifest JSONL file or of a TFDS dataset directory written by
  `radfm-jax publish` (tfds_manifest.py); with `split`, only that split's rows (a row without a
  `split` field is 'train')."""
  from radfm_jax.data.store import exists, is_url   # here: --help imports no TensorStore
  if not is_url(path) and os.path.isdir(path):
    from radfm_jax.data.tfds_manifest import read_tfds_manifest
    return read_tfds_manifest(path, split)
  if not (exists(path) if is_url(path) else os.path.isfile(path)):
    raise InputError(f'manifest {path}: no such file (expected a JSONL file or a TFDS '
                     'dataset directory)')
  rows = read_records(path, form='store')
  return rows if split is None else [r for r in rows if r.get('split', 'train') == split]


# ------------------------------------------------------------------------------------------------
# The schema as text: `radfm-jax ingest --help` and the table of docs/data.md


def schema_help(width: int = 98) -> str:
  """The field list for `--help`: one entry per field, wrapped to `width`."""
  lines = ['manifest fields (a JSON object per line; reference and examples: docs/data.md):']
  for f in SAMPLE_FIELDS + IMAGE_FIELDS:
    default = f.default if f.default.startswith('required') else f'default {f.default}'
    text = f'{f.name} ({f.type}; {default}): {f.meaning}'
    lines += textwrap.wrap(text, width, initial_indent='  ', subsequent_indent='      ')
  lines += textwrap.wrap('Other sample fields are yours, kept unchanged; a name close to a known '
                         'one (did you mean ...?) or an image field outside images is an error.',
                         width, initial_indent='  ', subsequent_indent='  ')
  return '\n'.join(lines)


def schema_markdown() -> str:
  """The field table of docs/data.md (Markdown)."""
  rows = ['| field | type | default | meaning |', '| --- | --- | --- | --- |']
  for f in SAMPLE_FIELDS + IMAGE_FIELDS:
    cells = [f'`{f.name}`', f.type, f.default, f.meaning]
    rows.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
  return '\n'.join(rows)
