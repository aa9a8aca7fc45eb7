"""`radfm-jax <command>`: the entry point ([project.scripts] in pyproject.toml).

Every command module defines `add_parser(subparsers)` and `run(args) -> exit code` and imports
the library only inside `run`, so `radfm-jax ingest` never imports the model. Exit codes: 0 done,
1 the command's own failure (see its --help), 2 a bad flag, config value or input file (one line
on stderr: `radfm_jax.errors.UserError`; `--verbose` adds the traceback), 130 interrupted (Ctrl-C;
a training run saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from radfm_jax.cli import flags

COMMANDS = ('ingest', 'recipes', 'tokenizer', 'publish', 'train', 'cache-images', 'generate', 'eval',
            'convert', 'merge', 'aot', 'demo')


class _TopFormatter(argparse.HelpFormatter):
  """argparse measures the command names at the subparsers' indent but prints them 2 columns
  further in, so a name of 9+ letters ('tokenizer', 'cache-images') would push its help to the next line."""

  def add_argument(self, action):
    super().add_argument(action)
    if isinstance(action, argparse._SubParsersAction):
      self._action_max_length += 2


def build_parser() -> argparse.ArgumentParser:
  import radfm_jax
  parser = argparse.ArgumentParser(prog='radfm-jax', description=__doc__.splitlines()[0],
                                   formatter_class=_TopFormatter)
  parser.add_argument('--version', action='version', version=f'%(prog)s {radfm_jax.__version__}')
  parser.add_argument('--verbose', action='store_true',
                      help='print the traceback of a bad-input error (default: one line)')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  for name in COMMANDS:
    module = importlib.import_module(f'radfm_jax.cli.{name.replace("-", "_")}')
    module.add_parser(sub).set_defaults(_run=module.run)
  return parser


def parse(argv=None) -> argparse.Namespace:
  """argv -> Namespace with `overrides` (['a.b=value', ...]); exits 2 on a bad flag."""
  args, extras = build_parser().parse_known_args(argv)
  overrides, rest = flags.split_overrides(extras)
  if rest:
    args._parser.error(f'unrecognized arguments: {" ".join(rest)}')
  if overrides and not args._takes_config:
    args._parser.error(f'radfm-jax {args.command} takes no config; got --config.{overrides[0]}')
  args.overrides = overrides
  return args


def _quiet_abandoned_tasks():
  """After the one line of a UserError the program exits, and the tasks and coroutines an
  aborted Orbax / TensorStore read left behind are garbage-collected: asyncio logs each as 'Task
  exception was never retrieved', Python each coroutine as 'Exception ignored in', with the same
  failure in full (hundreds of lines for one corrupt checkpoint file). The line has said it;
  `--verbose` keeps them. Only for the program: `main(argv)` called from Python changes no
  process-wide hook."""
  import logging
  logging.getLogger('asyncio').disabled = True
  sys.unraisablehook = lambda unraisable: None


def _closed_loop_filter(hook):
  """sys.unraisablehook without one known echo: when an Orbax restore fails on a corrupt file,
  asyncio closes its event loop while TensorStore reads are still in flight, and each read that
  completes later reports 'RuntimeError: Event loop is closed' with its traceback from a
  TensorStore thread (as an unraisable exception), around the one line that names the file."""
  def filtered(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return
    hook(unraisable)
  return filtered


def main(argv=None) -> int:
  from radfm_jax.errors import UserError
  args = parse(argv)
  # Run as the program (not `main(argv)` from Python): a command may restart itself with its
  # host allocator's settings (radfm_jax/hostmem.py).
  args._program = argv is None
  if args._program and not args.verbose:
    sys.unraisablehook = _closed_loop_filter(sys.unraisablehook)
  try:
    return int(args._run(args) or 0)
  except UserError as e:
    if args.verbose:
      import traceback
      traceback.print_exc()
    print(f'radfm-jax {args.command}: {e}', file=sys.stderr)
    if args._program and not args.verbose:      # the process ends here
      _quiet_abandoned_tasks()
    return 2
  except OSError as e:
    # A refused write no command wrapped (`errors.writing`): a makedirs or an open on a read-only
    # or full filesystem names its file itself. Only the errno values no read raises: a refused
    # read (EACCES) keeps its traceback.
    import errno

    from radfm_jax.errors import WRITE_FAULTS, write_failed
    if e.errno not in WRITE_FAULTS - {errno.EACCES, errno.EPERM} or not e.filename:
      raise
    if args.verbose:
      import traceback
      traceback.print_exc()
    print(f'radfm-jax {args.command}: {write_failed(e.filename, e.errno)}', file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    # a command may say what it kept (generate: the answers so far, in OUTPUT.partial)
    print(f'radfm-jax {args.command}: interrupted' + (f' ({e})' if str(e) else ''),
          file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
