"""What every command shares: the help formatter, `--config FILE:ARG` plus `--config.a.b=value`
overrides (the ml_collections.config_flags convention, on argparse), and the help text listing
the config's sections and fields."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import textwrap
import typing

OVERRIDE_PREFIX = '--config.'


class Formatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the description / epilog line breaks and shows the default of every optional flag
  whose help does not already say it (on/off switches are off by default)."""

  def _get_help_string(self, action):
    text = action.help or ''
    if (action.required or not action.option_strings or 'default' in text
        or action.default is argparse.SUPPRESS or isinstance(action.default, bool)):
      return text
    return text + (' (default: %(default)s)' if action.default not in (None, []) else
                   ' (default: none)')


@contextlib.contextmanager
def sigterm_as_interrupt():
  """For the block, SIGTERM (`kill`, a scheduler) ends the command as Ctrl-C does, with
  KeyboardInterrupt: the files it writes are closed as on an interrupt and the exit is one line
  and 130 (Python's default dies at once, silently, mid-write). Off the main thread, nothing
  changes."""
  def handle(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)
  try:
    previous = signal.signal(signal.SIGTERM, handle)
  except ValueError:
    previous = None
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def positive_int(text: str) -> int:
  """'16' -> 16; anything but an integer >= 1 is a usage error (exit 2) as the flags are parsed,
  before anything is touched (ingest: --batch-size 0 or -1 would otherwise stop the run or skip
  every scan)."""
  return _int_at_least(text, 1, 'a positive integer')


def non_negative_int(text: str) -> int:
  """'0', '16' -> the integer; a negative or non-integer value is a usage error (train:
  --max-steps -3 on a resumed run reported 'done' having trained nothing)."""
  return _int_at_least(text, 0, 'an integer >= 0')


def seed(text: str) -> int:
  """A seed flag: an integer in [0, 2^32) (config.SEED_LIMIT: a JAX key takes 32 bits)."""
  from radfm_jax.config import is_seed
  value = _int_at_least(text, 0, 'an integer in [0, 2^32)')
  if not is_seed(value):
    raise argparse.ArgumentTypeError(f'{text!r}: expected an integer in [0, 2^32)')
  return value


def non_negative_seconds(text: str) -> float:
  """'900', '0', '1.5' -> the float; a negative, NaN or infinite value is a usage error (demo:
  --time-budget -5 trained no step, nan set no limit)."""
  import math
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f'{text!r}: expected a number of seconds >= 0')
  return value


def _int_at_least(text: str, low: int, expected: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = low - 1
  if value < low:
    raise argparse.ArgumentTypeError(f'{text!r}: expected {expected}')
  return value


def check_output_folder(out: str, overwrite: bool):
  """`--out` of a command that writes a parameter-only checkpoint (convert, merge): a new path, or
  with `--overwrite` an empty folder or a parameter-only checkpoint (whose params/ and config.json
  are replaced); what a killed convert or merge left (`meta.unfinished_write`): its temporary
  files alone are written over, params/ without config.json is replaced with --overwrite. Never a
  file, a training run or any other folder: writing into one would mix the new parameters with
  what is there. A folder that cannot be written (a read-only disk) fails here, before the
  work."""
  from radfm_jax.checkpoint import meta
  from radfm_jax.errors import check_writable_folder
  meta.check_output_folder(out, f'--out {out}', overwrite)
  check_writable_folder(out, f'--out {out}')


def check_output_file(out: str, overwrite: bool):
  """`--out` of a command that writes one file (convert to-torch): a new path, or with
  `--overwrite` an existing file; never a folder, nor one in a folder that cannot be written or
  inside a checkpoint."""
  import os

  from radfm_jax.errors import InputError, check_parent_folder
  if os.path.isdir(out):
    raise InputError(f'--out {out}: is a folder; expected a file path (.bin or .safetensors)')
  if not out.endswith(('.bin', '.pt', '.pth', '.safetensors')):   # a typo wrote torch's format
    raise InputError(f'--out {out}: expected a file name ending in .safetensors, or .bin / .pt / '
                     '.pth for torch.save\'s format')
  # a file, a broken symlink or an unwritable folder on the way
  check_parent_folder(out, f'--out {out}', 'expected a file path (.bin or .safetensors)')
  from radfm_jax.checkpoint import meta          # e.g. in the params/ tree to-torch reads
  meta.check_outside_checkpoint(os.path.dirname(os.path.abspath(out)), f'--out {out}',
                                'expected a file outside any checkpoint folder')
  if os.path.exists(out) and not overwrite:
    raise InputError(f'--out {out}: exists; expected a new file (or --overwrite to replace it)')


def add_command(sub, name: str, *, help: str, description: str, example: str):
  """A subcommand parser with its description, defaults in --help and an example epilog."""
  parser = sub.add_parser(name, help=help, description=textwrap.fill(description, 98),
                          formatter_class=Formatter,
                          epilog='example:\n' + textwrap.indent(example.strip('\n'), '  '))
  parser.set_defaults(_parser=parser, _takes_config=False)
  return parser


def add_config_arguments(parser, *, required: bool, help: str, sections=None, note: str = ''):
  """`--config FILE:ARG` and the `--config.a.b=value` overrides, listed in the epilog.

  sections: the config sections the command reads (None: all).
  """
  parser.add_argument('--config', required=required, default=None, metavar='FILE:ARG', help=help)
  parser.set_defaults(_takes_config=True)
  parser.epilog = (parser.epilog or '') + '\n\n' + config_epilog(sections, note)


def config_epilog(sections=None, note: str = '') -> str:
  """The override syntax and the config's sections with their fields (from radfm_jax.config)."""
  from radfm_jax import config as config_lib
  lines = ['config overrides (repeatable, applied in order after --config FILE:ARG):',
           '  --config.SECTION.FIELD=VALUE  or  --config.SECTION.FIELD VALUE',
           '  VALUE is a Python literal (3, 1e-4, [1], True) or else a string.']
  if note:
    lines += textwrap.wrap(note, 98, initial_indent='  ', subsequent_indent='  ')
  lines.append('config sections and fields:')
  top = []

  def walk(prefix: str, cls):
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
      if dataclasses.is_dataclass(hints[f.name]):
        walk(f'{prefix}.{f.name}', hints[f.name])
      else:
        names.append(f.name)
    lines.extend(textwrap.wrap(f'{prefix}: {", ".join(names)}', 98, initial_indent='  ',
                               subsequent_indent='      '))

  hints = typing.get_type_hints(config_lib.Config)
  for f in dataclasses.fields(config_lib.Config):
    if dataclasses.is_dataclass(hints[f.name]):
      if sections is None or f.name in sections:
        walk(f.name, hints[f.name])
    elif f.name not in ('extra', 'source'):
      top.append(f.name)
  if sections is None and top:
    lines.append(f'  (top level): {", ".join(top)}')
  return '\n'.join(lines)


def split_overrides(extras: list[str]) -> tuple[list[str], list[str]]:
  """Tokens argparse did not know -> (['a.b=value', ...], tokens that are not overrides).

  Accepts `--config.a.b=value` and `--config.a.b value` (the value is the next token).
  """
  overrides, rest = [], []
  i = 0
  while i < len(extras):
    token = extras[i]
    if token.startswith(OVERRIDE_PREFIX) and len(token) > len(OVERRIDE_PREFIX):
      key, sep, value = token[len(OVERRIDE_PREFIX):].partition('=')
      if not sep:
        if i + 1 >= len(extras) or extras[i + 1].startswith(OVERRIDE_PREFIX):
          rest.append(token + ' (no value)')
          i += 1
          continue
        value = extras[i + 1]
        i += 1
      overrides.append(f'{key}={value}')
    else:
      rest.append(token)
    i += 1
  return overrides, rest


def restart_with_allocator(args, policy: str):
  """Restart this process once with `policy`'s glibc settings (`mesh.host_allocator`,
  radfm_jax/hostmem.py) when it runs as the `radfm-jax` program; never under `main(argv)` called
  from Python (a test, a notebook), whose process is not ours to replace."""
  if args._program:
    from radfm_jax import hostmem
    hostmem.restart_with(policy)
