"""`radfm-jax <command>`: a thin layer over the Python API.

Each command lives in its own module, which defines `add_arguments(parser)` and `run(args)`; the
module is imported only when its command runs, so `radfm-jax ingest` never imports the model.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    'ingest': ('radfm_jax.data.ingest', 'read scans (NIfTI, DICOM, PNG/JPEG, .npy) into a VolumeStore'),
    'publish': ('radfm_jax.data.tfds_manifest', 'publish a manifest as a TFDS ArrayRecord dataset'),
    'train': ('radfm_jax.train.loop', 'train or fine-tune from a config'),
    'generate': ('radfm_jax.infer.cli', 'generate answers for scans and prompts'),
    'eval': ('radfm_jax.eval.harness', 'score a checkpoint on a manifest'),
    'convert': ('radfm_jax.convert.cli', 'convert checkpoints: official PyTorch <-> Orbax, HF LLaMA'),
    'aot': ('radfm_jax.train.aot', 'compile the train step ahead of time for a TPU topology'),
    'demo': ('radfm_jax.demo', 'build the demo data, train `small`, evaluate, generate'),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='radfm-jax', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)
  for name, (module_name, help_text) in COMMANDS.items():
    sub_parser = sub.add_parser(name, help=help_text)
    sub_parser.set_defaults(_module=module_name)
    if name in sys.argv[1:2] or '--help' in sys.argv or '-h' in sys.argv:
      try:
        importlib.import_module(module_name).add_arguments(sub_parser)
      except ModuleNotFoundError as e:
        if e.name != module_name:
          raise
  return parser


def main(argv=None) -> int:
  if argv is not None:
    sys.argv = [sys.argv[0]] + list(argv)
  args = build_parser().parse_args(argv)
  try:
    module = importlib.import_module(args._module)
  except ModuleNotFoundError as e:
    if e.name == args._module:
      print(f'radfm-jax {args.command}: not available in this build ({args._module} missing)',
            file=sys.stderr)
      return 2
    raise
  return int(module.run(args) or 0)


if __name__ == '__main__':
  sys.exit(main())
