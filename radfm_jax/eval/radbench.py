"""RadBench-style evaluation: `radfm-jax eval --recipe radbench`.

    rows = harness.read_predictions('eval_out/predictions.jsonl')
    summary = radbench.score(rows, extractor)      # no model: scoring is apart from generation
    print(radbench.markdown(summary))

The RadFM paper evaluates on the test splits of the datasets it trains on (RadBench; the
original repository writes predictions and computes no metric, docs/original.md section 12).
The recipe: the manifest rows of split `test` (what `radfm-jax ingest --recipe NAME --split
test` writes; `--split` picks another), every sample scored by its task:

* closed questions (`kind` closed: modality recognition, yes/no diagnosis, multiple choice; the
  kind comes from the record, else `harness.CLOSED_TASKS` and the answer's form): accuracy by
  `metrics.closed_match`. Answer normalisation: lowercase, punctuation as spaces, whitespace
  collapsed; a yes/no reference is matched by the prediction's first word ("Yes, there is a
  mass." is yes); a one-letter reference (A-E) by the prediction's leading option letter ("b)",
  "(B) effusion", "answer: B"); a reference "B. effusion" also by that letter; any other
  reference (a modality name, an option text) by normalised equality ("CT." = "ct").
* open questions (VQA, reports, open diagnosis, rationale): corpus BLEU-1..4 (sacrebleu 13a,
  lowercased), mean ROUGE-L F (rouge-score, no stemming), mean token F1 (SQuAD-style).
* rationale diagnosis (`ENTITY_TASKS`): also the UMLS-entity precision / recall of the paper,
  with scispaCy (`eval/entities.py`; `--entities terms:FILE` for a term list). Without it, one
  line says why and every other number is still scored.

summary.json gains `recipe` and the tables `per_dataset` (by the records' `dataset`) and
`per_task`, each row a `metrics.compute_metrics` dict (+ `entities`); `markdown` renders them.
"""

from __future__ import annotations

import math

NAME = 'radbench'
SPLIT = 'test'
ENTITY_TASKS = ('rationale',)

# (column title, summary key); 'entities.precision' reads the row's entity scores.
COLUMNS = (('n', 'n'), ('closed acc', 'closed_accuracy'), ('BLEU-1', 'bleu1'),
           ('BLEU-2', 'bleu2'), ('BLEU-3', 'bleu3'), ('BLEU-4', 'bleu4'), ('ROUGE-L', 'rougeL'),
           ('token F1', 'token_f1'), ('UMLS P', 'entities.precision'),
           ('UMLS R', 'entities.recall'))


def score(rows: list[dict], extractor=None, extractor_reason: str = '') -> dict:
  """The RadBench scores of prediction rows: `harness.score` with the entity scores on
  `ENTITY_TASKS`, tagged with the recipe."""
  from radfm_jax.eval import harness
  return {'recipe': NAME, **harness.score(rows, extractor, extractor_reason, ENTITY_TASKS)}


def _cell(row: dict, key: str) -> str:
  value = row
  for part in key.split('.'):
    value = value.get(part) if isinstance(value, dict) else None
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return '-'
  return str(value) if isinstance(value, int) else f'{value:.4f}'


# The summary line's label, bold: a dataset or task named `all` (shown as plain `all`) keeps its
# own line beside it, and no escaped name can read `**all**` (`*` is escaped in names).
TOTAL = '**all**'


def cell_text(name: str) -> str:
  """A name as Markdown table-cell text, shown as it is: `|` would end the cell, a line break the
  row, and `\\`, `*`, `<` would be read as an escape, emphasis or HTML; so `\\ | * <` are
  backslash-escaped and a line break is `<br>`."""
  for ch in '\\|*<':
    name = name.replace(ch, '\\' + ch)
  return name.replace('\r\n', '<br>').replace('\n', '<br>').replace('\r', '<br>')


def table(rows: dict[str, dict], first: str, total: dict | None = None) -> str:
  """A Markdown table: one line per (name, metrics dict) of `rows` (names by `cell_text`), then
  `total` labelled `TOTAL` when given, the `COLUMNS`; '-' where a metric has no samples (e.g.
  closed accuracy of a report-only dataset)."""
  lines = ['| ' + ' | '.join([first] + [c for c, _ in COLUMNS]) + ' |',
           '| ' + ' | '.join(['---'] * (len(COLUMNS) + 1)) + ' |']
  labelled = [(cell_text(name), row) for name, row in rows.items()]
  for label, row in labelled + ([(TOTAL, total)] if total is not None else []):
    lines.append('| ' + ' | '.join([label] + [_cell(row, key) for _, key in COLUMNS]) + ' |')
  return '\n'.join(lines)


def markdown(summary: dict) -> str:
  """The per-dataset and per-task tables of a summary (each with a `TOTAL` line, the whole
  split), and the entity note when they were not computed."""
  overall = dict(summary['overall'])
  if summary['entities'].get('computed'):
    overall['entities'] = summary['entities']
  out = ['### RadBench by dataset', '', table(summary['per_dataset'], 'dataset', overall),
         '', '### RadBench by task', '', table(summary['per_task'], 'task', overall)]
  if not summary['entities'].get('computed'):
    out += ['', f'UMLS P / R not computed: {summary["entities"]["reason"]}']
  return '\n'.join(out)
