"""`radfm-jax --help` / `--version` and every subcommand's --help: a description, each optional
flag's default, an example; commands that take a config list the override syntax and fields."""

import argparse
import re

import pytest

import radfm_jax
from radfm_jax.cli import flags
from radfm_jax.cli.main import COMMANDS, build_parser, parse

CONFIG_COMMANDS = {'train', 'cache-images', 'generate', 'eval', 'aot', 'demo', 'convert from-torch',
                   'convert from-hf-llama'}


def _subparsers(parser):
  """{'train': parser, ..., 'convert from-torch': parser, ...}"""
  out = {}
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        out[name] = sub
        out.update({f'{name} {k}': v for k, v in _subparsers(sub).items()})
  return out


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    parse(['--version'])
  assert e.value.code == 0
  assert capsys.readouterr().out.strip() == f'radfm-jax {radfm_jax.__version__}'


@pytest.mark.parametrize('name', sorted(_subparsers(build_parser())))
def test_help_has_description_defaults_example(name, capsys):
  parser = _subparsers(build_parser())[name]
  with pytest.raises(SystemExit) as e:
    parse(name.split() + ['--help'])
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert len(parser.description) > 30 and parser.description.split()[0] in text
  assert '\nexample:\n  radfm-jax ' + name.split()[0] in text
  for action in parser._actions:
    if action.option_strings and not action.required and action.help is not argparse.SUPPRESS \
        and not isinstance(action.default, bool) and action.dest != 'help':
      help_text = parser.formatter_class('x')._get_help_string(action)
      assert 'default' in help_text, (name, action.option_strings)
  for action in parser._actions:        # kebab-case flags everywhere
    for option in action.option_strings:
      assert '_' not in option, (name, option)
  takes_config = name in CONFIG_COMMANDS
  assert ('--config FILE:ARG' in text) == takes_config
  assert ('--config.SECTION.FIELD=VALUE' in text) == takes_config
  if takes_config:
    assert 'generate: max_new_tokens, stop_ids, temperature, top_k, top_p' in text \
        or 'model.llama: vocab_size' in text


def test_every_command_is_listed(capsys):
  with pytest.raises(SystemExit):
    parse(['--help'])
  text = capsys.readouterr().out
  # argparse puts a long command name (cache-images) on a line of its own, its help below.
  assert all(re.search(rf'^    {name}( |$)', text, re.M) for name in COMMANDS)


def test_override_forms_and_errors(capsys):
  args = parse(['aot', '--config', 'configs/radfm.py:model=tiny', '--config.model.size', 'x',
                '--batch-2d', '4', '--config.train.freeze=vision,decoder'])
  assert args.overrides == ['model.size=x', 'train.freeze=vision,decoder']
  assert args.batch_2d == 4
  assert flags.split_overrides(['--config.a.b', '--config.c=1']) == (
      ['c=1'], ['--config.a.b (no value)'])
  for argv, message in ((['ingest', '--manifest', 'm', '--out', 'o', '--config.a=1'],
                         'radfm-jax ingest takes no config'),
                        (['train', '--config', 'c', '--workdir', 'w', '--max_steps', '3'],
                         'unrecognized arguments: --max_steps 3')):
    with pytest.raises(SystemExit) as e:
      parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
