"""The errors a user can fix, and how they are told (DESIGN section 10).

`UserError` is the base of every error caused by something the user passed: a config field, a
flag, a manifest line, a scan, a checkpoint file. The CLI prints it as one line, `radfm-jax
COMMAND: <message>`, and exits 2; `--verbose` adds the traceback. Any other exception is a bug or
an environment failure and keeps its traceback.

A message says what, where and what was expected: `manifest.jsonl line 3 field images[0].path:
file not found: scans/a.nii.gz`. `where()` builds the "where" part the same way everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re


class UserError(Exception):
  """Something the user passed is wrong; the message names it (file, line, key or field)."""


class InputError(UserError, ValueError):
  """A data file (manifest, scan, split file, checkpoint, tokenizer) is missing or malformed."""


class StepError(InputError):
  """A checkpoint step asked for that the checkpoint does not hold (or a step asked of a
  parameter-only checkpoint): an InputError from Python, and a command's `reading` block
  prefixes it with the flag that named the checkpoint ('--checkpoint run:7: ...')."""


class MissingStepError(StepError, FileNotFoundError):
  """A step number the run's checkpoints/ lacks (also a FileNotFoundError, as it was before it
  was an InputError)."""


class WriteError(UserError):
  """The filesystem refused to write an output (full, over the file-size limit, read-only, no
  permission): a fault of the machine, not a bug. The message names the file or folder; what was
  committed before it stays complete."""


# The errno values of a write the filesystem refused whatever was written (`write_fault`).
WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                          errno.EPERM})
_EXPECTED = 'expected free space, a file-size limit (ulimit -f) above the file and write permission'


def write_fault(err: BaseException) -> int | None:
  """The errno of `err` or of an exception it was raised from, when a write was refused
  (`WRITE_FAULTS`), else None: an OSError; TensorStore's ValueError (through Orbax too), which
  carries the code as `[os_error_code='28']`; or a library's own error that carries only the text
  ('No space left on device')."""
  seen = 0
  while err is not None and seen < 8:
    if isinstance(err, OSError) and err.errno is not None:
      if err.errno in WRITE_FAULTS:
        return err.errno
    else:
      m = re.search(r"os_error_code='?(\d+)", str(err))
      if m and int(m[1]) in WRITE_FAULTS:
        return int(m[1])
      code = next((c for c in sorted(WRITE_FAULTS) if os.strerror(c) in str(err)), None)
      if code is not None:
        return code
    err, seen = err.__cause__ or err.__context__, seen + 1
  return None


def write_failed(path: str, code: int, then: str = '') -> WriteError:
  """The one-line WriteError of a refused write of `path` (errno `code`); `then`: what the user
  can do next (after a semicolon)."""
  return WriteError(f'{path}: could not write ({os.strerror(code)}); {_EXPECTED} there'
                    + (f'; {then}' if then else ''))


@contextlib.contextmanager
def writing(path: str, then: str = ''):
  """Turns a refused write inside the block (`write_fault`) into `write_failed(path)`: the file
  a buffered write or a TensorStore array failed on is not in their errors (`OSError: [Errno 28]
  No space left on device`); any other error passes as it is."""
  try:
    yield
  except WriteError:
    raise
  except Exception as e:   # noqa: BLE001  (OSError, TensorStore's ValueError, Orbax's wrappers)
    code = write_fault(e)
    if code is None:
      raise
    raise write_failed(path, code, then) from e


@contextlib.contextmanager
def reading(name: str):
  """A missing file or folder, an unknown layout or step (FileNotFoundError, ValueError) inside
  the block as one InputError prefixed with `name` ('--checkpoint run/'); an InputError passes as
  it is: it names its file already."""
  try:
    yield
  except StepError as e:                 # names the folder, not the flag: prefixed
    raise InputError(f'{name}: {e}') from e
  except InputError:
    raise
  except (FileNotFoundError, ValueError) as e:
    raise InputError(f'{name}: {e}') from e


@contextlib.contextmanager
def whole_file(path: str, suffix: str = '.tmp'):
  """Yields `path + suffix` to write, renamed over `path` when the block succeeds and removed
  when it fails: a kill, an error or a refused write never leaves a cut file at `path` (an
  existing one stays), and a refused write is `write_failed(path)`."""
  tmp = path + suffix
  try:
    with writing(path):
      yield tmp
      os.replace(tmp, path)         # atomic
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def check_writable_folder(folder: str, shown: str):
  """WriteError when `folder` (or, when it does not exist yet, its nearest existing parent) is not
  writable: a read-only filesystem, or no permission. Checked before the work whose output goes
  there (root passes a permission check, never a read-only mount)."""
  probe = _nearest_existing(folder)
  if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
    code = errno.EROFS if _read_only(probe) else errno.EACCES
    raise WriteError(f'{shown}: {probe}: could not write ({os.strerror(code)}); expected a '
                     'folder this user can write')


def _nearest_existing(path: str) -> str:
  """`path` (absolute) or, when it does not exist yet, its nearest existing parent."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def _read_only(path: str) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


def check_parent_folder(path: str, shown: str, expected: str):
  """InputError `shown: PARENT is not a directory; expected` when the nearest existing parent of
  `path` is a file: an output there could only fail once the work is done."""
  parent = _nearest_existing(os.path.dirname(os.path.abspath(path)))
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
