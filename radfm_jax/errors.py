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
import tempfile


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
  writable: a read-only filesystem, no permission, or a filesystem that takes no new entries
  (/proc). Checked before the work whose output goes there: `os.access` first (root passes it
  whatever the mount), then a folder made and removed there at once (a read-only mount or /proc
  refuses it; nothing stays)."""
  probe = _nearest_existing(folder)
  if not os.path.isdir(probe):
    return                          # a file in the way: `check_parent_folder` says so
  code = None
  if not os.access(probe, os.W_OK | os.X_OK):
    code = errno.EROFS if _read_only(probe) else errno.EACCES
  else:
    try:
      os.rmdir(tempfile.mkdtemp(prefix='.radfm-jax-probe-', dir=probe))
    except OSError as e:
      code = e.errno or errno.EACCES
  if code is not None:
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


def not_a_file(path: str) -> str:
  """Why an input `path` that is not a file cannot be read: 'a folder' or 'no such file'."""
  return 'a folder' if os.path.isdir(path) else 'no such file'


def dangling_link(path: str) -> str | None:
  """`path` (made absolute) or the parent of it that is a symbolic link to a missing target (or a
  loop of links), else None: nothing can be made through it (FileNotFoundError, or
  FileExistsError for the link itself), and `os.path.exists` says False, as for a new path."""
  path = os.path.abspath(path)
  while True:
    if os.path.islink(path) and not os.path.exists(path):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent


def check_parent_folder(path: str, shown: str, expected: str):
  """The one check of an output path before the work (`shown`: how the user named it, e.g.
  '--out DIR'; `expected` ends the message), so a bad one fails at once, with nothing written,
  not once the work is done:
    InputError `shown: LINK is a symlink to a missing target (TARGET); expected` when `path` or a
      parent of it is a dangling symbolic link (`dangling_link`; or one in a loop of links);
    InputError `shown: PARENT is not a directory; expected` when the nearest existing parent of
      `path` is a file;
    WriteError (`check_writable_folder`) when the folder the output goes in (`path` itself when it
      is a folder, else its nearest existing parent) cannot be written."""
  link = dangling_link(path)
  if link is not None:
    try:
      os.stat(link)
      loop = False
    except OSError as e:
      loop = e.errno == errno.ELOOP
    what = 'in a loop of symlinks' if loop else 'a symlink to a missing target'
    raise InputError(f'{shown}: {link} is {what} ({os.readlink(link)}); {expected}')
  parent = _nearest_existing(os.path.dirname(os.path.abspath(path)))
  if not os.path.isdir(parent):
    raise InputError(f'{shown}: {parent} is not a directory; {expected}')
  check_writable_folder(path if os.path.isdir(path) else parent, shown)


# A code point U+D800..U+DFFF: half of a UTF-16 pair, not a character. JSON's "\ud800" escape
# decodes to one, and so does each byte of a command-line argument that is not UTF-8 (Python's
# surrogateescape); UTF-8 cannot encode it, so the text fails only later, where it is written or
# tokenized (UnicodeEncodeError, a SentencePiece RuntimeError).
_SURROGATE = re.compile('[\ud800-\udfff]')
NOT_TEXT_EXPECTED = 'expected UTF-8 text'


def escape_surrogates(text: str) -> str:
  """`text` with its surrogates as \\udXXX escapes: printable, and what the JSON held."""
  return text.encode('utf-8', 'backslashreplace').decode('utf-8')


def not_text(value, field: str | None = None) -> tuple[str | None, str] | None:
  """Where `value` is not Unicode text, else None: the one check of 'is this valid text' for
  every reader of user text. `value` is a str, or decoded JSON (lists and objects searched in
  order, object keys too); returns (field, problem) for the first string holding a lone surrogate
  (`_SURROGATE`): the field named as `where` names one ('images[0].modality', from `field`), None
  for `value` itself; the problem 'holds a lone surrogate \\ud800 (not Unicode text); expected
  UTF-8 text'."""
  if isinstance(value, str):
    m = _SURROGATE.search(value)
    if m is None:
      return None
    return field, (f'holds a lone surrogate {escape_surrogates(m[0])} (not Unicode text); '
                   f'{NOT_TEXT_EXPECTED}')
  if isinstance(value, dict):
    for key, item in value.items():
      name = escape_surrogates(str(key))
      name = f'{field}.{name}' if field else name
      found = not_text(key, name) or not_text(item, name)
      if found:
        return found
  elif isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      found = not_text(item, f'{field}[{i}]' if field else f'[{i}]')
      if found:
        return found
  return None


def check_text(value, shown: str):
  """InputError `shown field F: holds a lone surrogate ...` when `value` (`not_text`) is not
  Unicode text; `shown` names where it came from ('samples.jsonl line 3', '--prompt')."""
  found = not_text(value)
  if found is not None:
    field, problem = found
    raise InputError(f'{shown} field {field}: {problem}' if field else f'{shown}: {problem}')


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
