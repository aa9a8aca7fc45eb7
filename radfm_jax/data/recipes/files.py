"""Reading the original RadFM's split files: CSV (what its datasets read with pandas) and JSON (a
list of objects), row by row, each row knowing where it is for messages.

    rows = read_rows('vqarad_test.csv', columns=('Figure_path', 'Question', ...))

A whole-file problem (no such file, not UTF-8, broken quoting, a required column absent from the
header or a column named twice in it, a JSON file that is not a list of objects) is an
`InputError` naming the file (and the line or column). CSV is read with `strict=True`, so a stray
quote stops the read, and a quoted field still open at the end of the file (which would have
swallowed every row after it) names the line where it opened; quoted fields holding newlines are
read as the one cell they are. A row-level problem is a `RowError` the recipe turns into a
counted reject.

Row numbering. `Row.n` counts data rows from 0 in file order, blank lines skipped, as pandas'
`iloc` index does; it names the record (`NAME-SPLIT-n`) and seeds the row's prompt choices. A CSV
row's place is `FILE line L` (L: its first physical line, the header being line 1); a JSON item's
is `FILE [n]`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

from radfm_jax.errors import InputError, check_text, not_text, where

# pandas, which the original reads its CSV files with, has no limit on a cell's length; the csv
# module's default (131072 characters) would make a valid file with a long report "not valid CSV".
# The largest value a C long holds on every platform (sys.maxsize overflows it on Windows).
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


class RowError(Exception):
  """One row cannot become a record: `field` (a column / key, or None for the whole row) and
  what is wrong with it, worded as 'got ...; expected ...'."""

  def __init__(self, field: str | None, problem: str):
    super().__init__(problem)
    self.field, self.problem = field, problem


@dataclasses.dataclass(frozen=True)
class Row:
  path: str                     # the split file
  n: int                        # data row index from 0
  line: int | None              # CSV: first line of the row; JSON: None
  values: dict                  # column / key -> value (CSV: strings)

  def place(self, field: str | None = None) -> str:
    if self.line is not None:
      return where(self.path, self.line, field)
    return f'{self.path} [{self.n}]' + (f' field {field}' if field else '')

  def text(self, field: str, empty_ok: bool = False) -> str:
    """The cell as text; an absent or empty required cell (pandas: NaN) is a RowError."""
    value = self.values.get(field)
    if value is None or value == '':
      if empty_ok:
        return ''
      raise RowError(field, 'empty; expected a value')
    if not isinstance(value, str):
      raise RowError(field, f'got {json.dumps(value)[:60]}; expected a string')
    return value


def check_file(path: str):
  """InputError unless `path` is a file: what is wrong with a split file is said before anything
  about its name or content."""
  if os.path.isdir(path):
    raise InputError(f'{path}: a folder; expected the split file of the recipe (a folder of '
                     'split files goes with --recipe radfm)')
  if not os.path.isfile(path):
    raise InputError(f'{path}: split file not found; expected the original RadFM file of this '
                     'recipe (radfm-jax recipes list names them)')


def _open_text(path: str):
  check_file(path)
  return open(path, encoding='utf-8-sig', newline='')


def _not_utf8(path: str, error: UnicodeDecodeError, expected: str) -> InputError:
  """'FILE line N: not UTF-8 text (...)': the decoder's position counts from the chunk it was
  given, not the file, so the line is found again from the bytes."""
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      try:
        raw.decode('utf-8')
      except UnicodeDecodeError as e:
        return InputError(f'{where(path, n)}: not UTF-8 text (byte {raw[e.start]:#04x} at column '
                          f'{e.start + 1}: {e.reason}); {expected}')
  return InputError(f'{path}: not UTF-8 text ({error.reason}); {expected}')


def read_rows(path: str, columns: tuple[str, ...]) -> list[Row]:
  """Every row of a CSV or JSON split file; `columns` must all be there (InputError naming the
  first one missing)."""
  if path.lower().endswith('.json'):
    return _json_rows(path, columns)
  return _csv_rows(path, columns)


def _open_quote_line(path: str, first: int) -> int | None:
  """The line where a quoted field that runs to the end of the file opens (None: none does),
  reading from line `first` (where its row starts) with the csv module's rules: a quote opens a
  field only at its start, and "" inside one is a quote."""
  with _open_text(path) as f:
    lines = f.readlines()[first - 1:]
  quoted, at_start, opened = False, True, first
  for n, line in enumerate(lines, first):
    i = 0
    while i < len(line):
      c = line[i]
      if quoted and c == '"':
        if line[i + 1:i + 2] == '"':
          i += 1                       # an escaped quote
        else:
          quoted = False
      elif not quoted and c == '"' and at_start:
        quoted, opened = True, n
      at_start = not quoted and c in ',\r\n'
      i += 1
  return opened if quoted else None


def _csv_rows(path: str, columns) -> list[Row]:
  rows = []
  last = 0                             # the last line of the row read before
  try:
    with _open_text(path) as f:
      reader = csv.reader(f, strict=True)
      header = next(reader, None)
      if header is None:
        raise InputError(f'{where(path, 1)}: empty file; expected a header line naming the columns '
                         f'{", ".join(columns)}')
      twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
      if twice is not None:
        raise InputError(f'{where(path, 1, twice)}: column named twice in the header; expected '
                         'each column once (which one a row\'s value comes from would be a guess)')
      for name in columns:
        if name not in header:
          raise InputError(f'{where(path, 1, name)}: no such column; expected the columns '
                           f'{", ".join(columns)} (found {", ".join(header)})')
      last = reader.line_num
      for cells in reader:
        start, last = last + 1, reader.line_num
        if not cells:                  # a blank line (pandas skips them too)
          continue
        values = dict(zip(header, cells))
        if len(cells) != len(header):
          values = {'__malformed__': f'{len(cells)} cells; expected {len(header)}, one per '
                    'column of the header'}
        rows.append(Row(path, len(rows), start, values))
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e, 'expected a UTF-8 CSV file') from None
  except csv.Error as e:
    line = _open_quote_line(path, last + 1)
    if line is not None:
      raise InputError(f'{where(path, line)}: not valid CSV (a quoted field opens here and is '
                       'never closed, so every line after it would be read as its text); '
                       'expected a closing quote (a quote inside a quoted field is written "")'
                       ) from None
    raise InputError(f'{where(path, reader.line_num)}: not valid CSV ({e}); expected the '
                     'original\'s comma-separated format') from None
  return rows


def _json_rows(path: str, columns) -> list[Row]:
  # here: `recipes list` loads no TensorStore
  from radfm_jax.data.store import JSON_TYPES, loads_unique
  try:
    with _open_text(path) as f:
      data = loads_unique(f.read(), path)
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e, 'expected a UTF-8 JSON file') from None
  except json.JSONDecodeError as e:
    raise InputError(f'{where(path, e.lineno)}: not valid JSON ({e.msg}, column {e.colno}); '
                     'expected a list of objects') from None
  if not isinstance(data, list):
    raise InputError(f'{path}: got a JSON {JSON_TYPES.get(type(data), "value")}; expected a list '
                     'of objects, one per sample')
  objects = [item for item in data if isinstance(item, dict)]
  for name in columns:
    if objects and not any(name in item for item in objects):
      raise InputError(f'{path} field {name}: in no item; expected every item to hold the keys '
                       f'{", ".join(columns)}')
  rows = []
  for n, item in enumerate(data):
    values = item if isinstance(item, dict) else {
        '__malformed__': f'got {json.dumps(item)[:60]}; expected an object'}
    rows.append(Row(path, n, None, values))
  return rows


def check_row(row: Row, columns) -> None:
  """A row cut short or longer than the header, a non-object JSON item, a missing key, or a value
  that is not Unicode text (a JSON "\\ud800" escape: `errors.not_text`): RowError."""
  if '__malformed__' in row.values:
    raise RowError(None, 'malformed row: ' + row.values['__malformed__'])
  found = not_text(row.values)
  if found is not None:
    raise RowError(*found)
  for name in columns:
    if name not in row.values:
      raise RowError(name, 'missing; expected a value')


def read_json_file(path: str, what: str):
  """A side file of a recipe (e.g. modality_set.json), parsed; InputError naming it."""
  from radfm_jax.data.store import loads_unique
  try:
    with _open_text(path) as f:
      text = f.read()
  except InputError:
    raise InputError(f'{path}: not found; expected {what}') from None
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e, f'expected {what}') from None
  try:
    data = loads_unique(text, path)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f'{path}: not valid JSON ({e}); expected {what}') from None
  check_text(data, path)          # a "\ud800" escape: valid JSON, not text
  return data
