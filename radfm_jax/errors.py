"""The errors a user can fix, and how they are told (DESIGN section 10).

`UserError` is the base of every error caused by something the user passed: a config field, a
flag, a manifest line, a scan, a checkpoint file. The CLI prints it as one line, `radfm-jax
COMMAND: <message>`, and exits 2; `--verbose` adds the traceback. Any other exception is a bug or
an environment failure and keeps its traceback.

A message says what, where and what was expected: `manifest.jsonl line 3 field images[0].path:
file not found: scans/a.nii.gz`. `where()` builds the "where" part the same way everywhere.
"""

from __future__ import annotations


class UserError(Exception):
  """Something the user passed is wrong; the message names it (file, line, key or field)."""


class InputError(UserError, ValueError):
  """A data file (manifest, scan, split file, checkpoint, tokenizer) is missing or malformed."""


def check_parent_folder(path: str, shown: str, expected: str):
  """InputError `shown: PARENT is not a directory; expected` when the nearest existing parent of
  `path` is a file: an output there could only fail once the work is done."""
  import os
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise InputError(f'{shown}: {parent} is not a directory; {expected}')


def where(path=None, line: int | None = None, field: str | None = None) -> str:
  """'manifest.jsonl line 3 field images[0].path' (parts that are None are left out)."""
  parts = []
  if path is not None:
    parts.append(str(path))
  if line is not None:
    parts.append(f'line {line}')
  if field is not None:
    parts.append(f'field {field}')
  return ' '.join(parts)
