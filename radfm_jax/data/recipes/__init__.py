"""Recipes: the original RadFM's own split files (the `RadFM_data_csv` download: one CSV or JSON per
dataset and split, naming PNG/JPEG images and per-case `.npy` stacks) -> input-manifest records
-> the store, through the one ingest path.

    radfm-jax recipes list
    radfm-jax ingest --recipe vqa_rad --source vqarad_test.csv --image-root DIR --out STORE
    radfm-jax ingest --recipe radfm --source data_csv/ --image-root DIR --out STORE

    result = records('vqa_rad', 'vqarad_test.csv', 'DIR')       # .records, .rejects, .rows
    reports = ingest_recipe('radfm', 'data_csv/', 'DIR', 'STORE')

`RECIPES` is the one table (name -> `Recipe`): the original's file names for train and test, the
columns read, the task, 2D or 3D, and the builder (recipes/build.py) that turns a row into a
sample with the original's prompt family, answer and image placement. Each record is tagged
`dataset` = the recipe name, `task`, `split`, and `source` (FILE line N) for tracing.

Determinism. The original draws prompts and positions with the global `random` at each read; a
recipe draws them from `random.Random(f'{seed}/{name}/{split}/{n}')` for data row n (from 0), so a
file gives the same records on every run and machine (`seed`: `ingest --seed`, default 0).

Nothing is dropped silently. A missing file or column, a column named twice, broken CSV quoting,
or a JSON file that is not a list is an `InputError` (one line: file, line, column). A row that
cannot be a sample (an empty required cell, a bad label, an image file that does not exist, a row
with the wrong number of cells) is a counted reject `FILE line N field COLUMN: problem`, printed
(the first 20 per recipe), written to STORE/rejects.jsonl with the scans ingest rejects, and
counted per recipe.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from typing import Callable

from radfm_jax.data.prompts import image_token_in
from radfm_jax.data.recipes import build as b
from radfm_jax.data.recipes.files import RowError, check_file, check_row, read_rows
from radfm_jax.errors import InputError

SPLITS = ('train', 'test')


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str                      # our dataset name: the records' `dataset`
  original: str                  # the original's dataset key (multi_dataset.py dataset_reflect)
  train: str | None              # the original's split file names
  test: str | None
  columns: tuple[str, ...]       # read from every row (CSV columns / JSON keys)
  optional: tuple[str, ...]      # read when present
  task: str                      # our task name(s), in words
  dims: str                      # '2D' or '3D' (batched apart)
  build: Callable
  prompts: str | None = None     # recipes/prompts/NAME.json
  side_files: tuple[str, ...] = ()   # other files beside the split file
  downsample: int = 1            # the original's epoch reads 1 row in `downsample` (train)

  def file(self, split: str) -> str | None:
    return self.train if split == 'train' else self.test


def _r(*args, **kwargs) -> tuple[str, Recipe]:
  recipe = Recipe(*args, **kwargs)
  return recipe.name, recipe


_YES_NO = ('image_path', 'disease', 'label')
_LABEL = ('image_path', 'label')
_VQA = ('img_root_dir', 'Figure_path', 'Question', 'Answer')
_ARTICLE = ('pat', 'pre', 'npy_path')

RECIPES: dict[str, Recipe] = dict([
    _r('medpix_multi', 'medpix_multi_dataset', 'MedPix_multi_train.csv', None,
       ('name', 'context', 'type'), ('history',),
       'by type: diagnosis_open, report, rationale, vqa', '2D', b.medpix_multi),
    _r('medpix_single', 'medpix_single_dataset', 'MedPix_single_train.csv', None,
       ('name', 'context', 'type'), (), 'by type: modality, vqa (plane), report (caption)', '2D',
       b.medpix_single, downsample=5),
    _r('medpix_qa', 'medpix_qa_dataset', 'MedPix_questions_train.csv', None,
       ('name', 'question', 'answer'), ('explanation',), 'vqa', '2D', b.medpix_qa),
    _r('mimic_caption', 'chestxray_caption_dataset', 'mimic_caption_train.csv',
       'mimic_caption_test.csv', _LABEL, (), 'report', '2D', b.labelled('report'), 'report'),
    _r('chestxray_yes_no', 'chestxray_dataset_bn', 'chestxray_balance_train_new.csv',
       'chestxray_balance_test.csv', _YES_NO, (), 'diagnosis_yes_no', '2D', b.yes_no, 'yes_no'),
    _r('pcxr_yes_no', 'pcxr_dataset_bn', 'pcxr_balance_train.csv', 'pcxr_balance_test.csv',
       _YES_NO, (), 'diagnosis_yes_no', '2D', b.yes_no, 'yes_no'),
    _r('mammo_yes_no', 'mammo_dataset_bn', 'mammo_balance_train.csv', 'mammo_balance_test.csv',
       _YES_NO, (), 'diagnosis_yes_no', '2D', b.yes_no, 'yes_no'),
    _r('spinexr_yes_no', 'spinexr_dataset_bn', 'spinexr_balance_train.csv',
       'spinexr_balance_test.csv', _YES_NO, (), 'diagnosis_yes_no', '2D', b.yes_no, 'yes_no'),
    _r('chestxray_diagnosis', 'chestxray_dataset', 'chestxray_new.csv', 'chestxray_test.csv',
       _LABEL, (), 'diagnosis_open', '2D', b.labelled('diagnosis_open'), 'cls'),
    _r('pcxr_diagnosis', 'pcxr_dataset', 'pcxr_train_new.csv', 'pcxr_test.csv', _LABEL, (),
       'diagnosis_open', '2D', b.labelled('diagnosis_open'), 'cls'),
    _r('mammo_diagnosis', 'mammo_dataset', 'mammo_train_new.csv', 'mammo_test.csv', _LABEL, (),
       'diagnosis_open', '2D', b.labelled('diagnosis_open'), 'mammo'),
    _r('spinexr_diagnosis', 'spinexr_dataset', 'spinexr_train_new.csv', 'spinexr_test.csv',
       _LABEL, (), 'diagnosis_open', '2D', b.labelled('diagnosis_open'), 'spinexr'),
    _r('pmc_vqa', 'pmcvqa_dataset', 'pmcvqa_train.csv', 'pmcvqa_test.csv', _VQA, (), 'vqa', '2D',
       b.vqa),
    _r('case_report', 'casereport_dataset', 'filtered_case_report_train.csv',
       'filtered_case_report_test.csv', ('PMC_id', 'img_ref', 'context', 'question', 'answer'), (),
       'vqa', '2D', b.case_report),
    _r('vqa_rad', 'vqarad_dataset', 'vqarad_train.csv', 'vqarad_test.csv', _VQA, (), 'vqa', '2D',
       b.vqa),
    _r('slake', 'slake_dataset', 'slakevqa_train.csv', 'slakevqa_test.csv', _VQA, (), 'vqa', '2D',
       b.vqa),
    _r('radio_vqa', 'radiovqa_dataset', 'radiology_vqa_train.csv', 'radiology_vqa_test.csv',
       ('image_path', 'question', 'answer'), (), 'vqa', '3D', b.radio_vqa),
    _r('radio_modality', 'radiomodality_dataset', 'radio_modality_train.csv',
       'radio_modality_test.csv', ('image_path', 'answer'), (), 'modality', '3D',
       b.radio_modality, 'modality', ('modality_set.json',), downsample=5),
    _r('radio_caption', 'radiocaption_dataset', 'radiology_article_npy_train.json',
       'radiology_article_npy_test.json', _ARTICLE + ('finding', 'impression'), (), 'report',
       '3D', b.radio_caption, 'caption'),
    _r('radio_features', 'radiofeatures_dataset', 'radiology_article_npy_train.json',
       'radiology_article_npy_test.json',
       _ARTICLE + ('title', 'articles', 'radiographic_features'), (),
       'rationale; diagnosis_yes_no (p = 0.5)', '3D', b.radio_features, 'radiology_feature',
       ('articles_resave.json',)),
    _r('pmcoa', 'pmcoa_dataset', 'pmcoa_image_caption_train.csv', None,
       ('Figure_path', 'Caption'), (), 'report', '2D', b.pmcoa, 'caption'),
    _r('paper_inline', 'paper_inline_dataset', 'paper_train.csv', None, ('PMC_path',), (),
       'interleaved', '2D', b.paper_inline),
])

ALL = 'radfm'            # the recipe name that means: every recipe, from one folder
MAX_PRINTED = 20         # reject lines printed per recipe (all of them go to rejects.jsonl)


def recipe(name: str) -> Recipe:
  if name not in RECIPES:
    raise InputError(f'recipe {name!r}: unknown; expected one of {", ".join(RECIPES)} or '
                     f'{ALL} (radfm-jax recipes list)')
  return RECIPES[name]


def original_size(name: str, rows: int, split: str = 'train') -> int:
  """How many samples one epoch of the original draws from `rows` rows (MedPix single and the
  modality set read 1 row in 5 per epoch in training: ceil(rows / 5)); what a size-proportional
  mixture weight of the original uses."""
  step = recipe(name).downsample if split == 'train' else 1
  return -(-rows // step)


@dataclasses.dataclass
class RecipeResult:
  name: str
  source: str
  split: str
  rows: int = 0
  records: list[dict] = dataclasses.field(default_factory=list)
  rejects: list[dict] = dataclasses.field(default_factory=list)   # {'path', 'line', 'field', ...}

  def summary(self) -> str:
    return (f'recipe {self.name} ({os.path.basename(self.source)}, split {self.split}): '
            f'{self.rows} rows -> {len(self.records)} records, {len(self.rejects)} rejected')


def split_of(r: Recipe, source: str, split: str | None) -> str:
  """The split to tag: `split`, else the one whose original file name `source` has."""
  if split is not None:
    if split not in SPLITS:
      raise InputError(f'split {split!r}: expected one of {", ".join(SPLITS)}')
    return split
  base = os.path.basename(source)
  for s in SPLITS:
    if r.file(s) == base:
      return s
  names = ', '.join(f'{s}: {r.file(s)}' for s in SPLITS if r.file(s))
  raise InputError(f'{source}: not one of the original file names of recipe {r.name} ({names}); '
                   'expected one of them, or --split train|test')


def records(name: str, source: str, image_root: str, split: str | None = None,
            seed: int = 0) -> RecipeResult:
  """One split file of recipe `name` -> input-manifest records (image paths resolved against
  `image_root` and checked to exist) and the rows rejected, each with where and why."""
  r = recipe(name)
  check_file(source)                   # a missing file is that, whatever its name
  split = split_of(r, source, split)
  result = RecipeResult(name, source, split)
  rows = read_rows(source, r.columns)
  result.rows = len(rows)
  side: dict = {}
  for row in rows:
    ctx = b.Ctx(random.Random(f'{seed}/{name}/{split}/{row.n}'), os.path.abspath(image_root),
                source, r.prompts, side)
    try:
      check_row(row, r.columns)
      sample = r.build(row, ctx)
      for field, text in (('question', sample.question), ('answer', sample.answer)):
        token = image_token_in(text)
        if token is not None:       # the tokenizer would read it as an image token
          raise RowError(None, f'its {field} holds {token!r}, which the tokenizer reads as an '
                         'image token; expected plain text')
    except RowError as e:
      result.rejects.append({'path': os.path.abspath(source), 'line': row.line, 'row': row.n,
                             'field': e.field, 'recipe': name,
                             'reason': f'{row.place(e.field)}: {e.problem}'})
      continue
    record = {'id': f'{name}-{split}-{row.n}', 'dataset': name, 'split': split,
              'task': sample.task, 'question': sample.question, 'answer': sample.answer,
              **sample.fields, 'images': sample.images,
              'source': row.place().replace(source, os.path.basename(source), 1)}
    result.records.append(record)
  from radfm_jax.data.manifest import validate_records
  validate_records(result.records, form='input')      # a builder bug must not reach the store
  return result


def find_files(folder: str, split: str | None = None) -> tuple[list[tuple[str, str, str]],
                                                                list[tuple[str, str]]]:
  """The original split files in `folder` (searched recursively, by file name):
  ([(recipe, split, path)] found, [(recipe, file name)] missing)."""
  if not os.path.isdir(folder):
    raise InputError(f'{folder}: not a folder; expected the folder holding the original RadFM '
                     'split files (RadFM_data_csv)')
  where_is: dict[str, list[str]] = {}
  for top, _, names in sorted(os.walk(folder)):
    for n in sorted(names):
      where_is.setdefault(n, []).append(os.path.join(top, n))
  wanted = {f for r in RECIPES.values() for f in (r.train, r.test) if f}
  twice = [paths for n, paths in where_is.items() if n in wanted and len(paths) > 1]
  if twice:
    raise InputError(f'{folder}: {os.path.basename(twice[0][0])} found more than once '
                     f'({", ".join(twice[0])}); expected one file per original name (give the '
                     'folder that holds the one you mean)')
  found, missing = [], []
  for r in RECIPES.values():
    for s in (split,) if split else SPLITS:
      name = r.file(s)
      if name is None:
        continue
      if name in where_is:
        found.append((r.name, s, where_is[name][0]))
      else:
        missing.append((r.name, name))
  return found, missing


def image_roots(roots: str | dict[str, str]) -> Callable[[str], str]:
  """recipe name -> its image root, from one folder for all or {'': default, NAME: folder}
  (the original keeps MedPix images, PMC figures and subfigures in folders of their own)."""
  if isinstance(roots, str):
    return lambda name: roots
  for name in roots:
    if name:
      recipe(name)
  def root(name: str) -> str:
    if name not in roots and '' not in roots:
      raise InputError(f'recipe {name}: no image root; expected --image-root DIR (for every '
                       f'recipe) or --image-root {name}=DIR')
    return roots.get(name, roots.get(''))
  return root


def collect(name: str, source: str, image_root: str | dict[str, str], split: str | None = None,
            seed: int = 0, log=None) -> list[RecipeResult]:
  """Recipe `name` on file `source`, or with name 'radfm' every recipe whose original file is in
  folder `source`; prints what was found, missing and rejected to `log`. `image_root`: one folder,
  or {'': default, NAME: folder} (`image_roots`)."""
  log = log or sys.stderr
  root_of = image_roots(image_root)
  if name == ALL:
    found, missing = find_files(source, split)
    print(f'recipes: found under {source}: '
          + (', '.join(f'{os.path.basename(p)} ({n})' for n, _, p in found) or 'nothing'), file=log)
    if missing:
      print(f'recipes: missing under {source}: '
            + ', '.join(f'{f} ({n})' for n, f in missing), file=log)
    if not found:
      raise InputError(f'{source}: holds none of the original RadFM split files; expected e.g. '
                       f'{RECIPES["vqa_rad"].test} (radfm-jax recipes list names them all)')
    jobs = found
  else:
    jobs = [(name, split, source)]
  results = []
  for n, s, path in jobs:
    res = records(n, path, root_of(n), s, seed)
    for reject in res.rejects[:MAX_PRINTED]:
      print(f'recipes: rejected {reject["reason"]}', file=log)
    if len(res.rejects) > MAX_PRINTED:
      print(f'recipes: ... and {len(res.rejects) - MAX_PRINTED} more rejects of {n} (all in '
            'STORE/rejects.jsonl)', file=log)
    print(res.summary(), file=log)
    results.append(res)
  return results


def ingest_recipe(name: str, source: str, image_root: str | dict[str, str], out: str,
                  split: str | None = None,
                  seed: int = 0, log=None, **ingest_options):
  """`collect` then one ingest of all the records into `out` (ingest.py: locking, merging,
  scan rejects); returns (results, IngestReport). The rows rejected here are listed in
  STORE/rejects.jsonl with the scans, and a per-recipe count of the samples kept is printed."""
  from radfm_jax.data.ingest import IngestError, ingest
  log = log or sys.stderr
  strict = ingest_options.pop('strict', False)
  for folder in (image_root.values() if isinstance(image_root, dict) else [image_root]):
    if '://' not in folder and not os.path.isdir(folder):    # a kvstore URL is not checked
      # else every row would be rejected as not found, into an empty store
      raise InputError(f'--image-root {folder}: no such folder; expected the folder the '
                       'recipe\'s image paths start from (nothing was written)')
  results = collect(name, source, image_root, split, seed, log)
  if not any(res.rows for res in results):
    files = ', '.join(f'{res.name} {res.split}' for res in results) or 'it'
    raise InputError(f'--source {source}: no rows in {files}; expected the split files of the '
                     'recipe with their samples (nothing was written)')
  all_records = [rec for res in results for rec in res.records]
  row_rejects = [rej for res in results for rej in res.rejects]
  report = ingest(all_records, out, log=log, rejects=row_rejects, **ingest_options)
  dropped = {str(r['sample_id']) for r in report.rejects if 'sample_id' in r}
  for res in results:
    kept = sum(rec['id'] not in dropped for rec in res.records)
    print(f'recipes: {res.name} {res.split}: {res.rows} rows, {len(res.rejects)} rows rejected, '
          f'{len(res.records) - kept} samples dropped by ingest, {kept} samples ingested',
          file=log)
  if strict and report.rejects:
    where_listed = os.path.join(out, 'rejects.jsonl')
    raise IngestError(f'{report.rejected_text()} (see {where_listed})')
  return results, report
