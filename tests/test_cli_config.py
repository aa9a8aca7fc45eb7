"""`--config` / `--config.generate.*` reach decoding: each generate field, given on the command
line of `radfm-jax generate`, changes what is generated (or, for the two that must not change the
tokens, what is compiled), and a bad value is one error line naming the field (exit code 2)."""

import glob
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import conftest_data as cd  # noqa: E402
from radfm_jax import api  # noqa: E402
from radfm_jax.cli.main import main  # noqa: E402
from radfm_jax.config import ConfigError, GenerateConfig, model_config  # noqa: E402
from radfm_jax.infer import panel_kernel  # noqa: E402
from radfm_jax.infer.generate import cache_limits  # noqa: E402
from radfm_jax.infer.settings import generate_config  # noqa: E402

pytestmark = pytest.mark.xdist_group('cli_config')

NEW = 5          # max_new_tokens of these tests (no other test compiles it: fresh IR dumps)
PROMPT = 'Is there a nodule?'


def _always_two(model, logit: float):
  """Edits `model` so every step's logits are `logit` at id 2 (</s>) and 0 elsewhere: attention
  and MLP outputs zeroed (the residual stream is the token embedding), every embedding the ones
  vector (RMSNorm of it: ones), lm_head reading that into id 2 only."""
  llama = model.llama
  for dense in (llama.layers.o, llama.layers.down):
    dense.kernel[...] = np.zeros(dense.kernel[...].shape, np.float32)
  llama.embed_tokens[...] = np.ones(llama.embed_tokens[...].shape, np.float32)
  head = np.zeros(llama.lm_head.kernel[...].shape, np.float32)    # [hidden, vocab]
  head[:, 2] = logit / head.shape[0]
  llama.lm_head.kernel[...] = head
  return model


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  """(folder, tokenizer path, 'always 2' checkpoint, random checkpoint, prompts JSONL)."""
  from radfm_jax.models.radfm import create_model
  root = tmp_path_factory.mktemp('cli_config')
  api.save(_always_two(create_model(cd.tiny_model(), seed=1), 2.0), str(root / 'two'))
  api.save(create_model(cd.tiny_model(), seed=1), str(root / 'random'))
  (root / 'tok.model').write_bytes(cd.spm_proto())
  cd.write_manifest(root / 'in.jsonl', [{'id': 'q', 'prompt': PROMPT}])
  return root


def _generate(root, ckpt: str, *flags, dump: str | None = None) -> dict:
  """`radfm-jax generate` on in.jsonl -> its one output row; `dump`: JAX IR dump folder."""
  out = root / 'out.jsonl'
  if dump:
    jax.config.update('jax_dump_ir_to', dump)
  try:
    rc = main(['generate', '--checkpoint', str(root / ckpt), '--tokenizer', str(root / 'tok.model'),
               '--input', str(root / 'in.jsonl'), '--output', str(out), *flags])
  finally:
    jax.config.update('jax_dump_ir_to', '')
  assert rc == 0
  return json.loads(out.read_text())


def test_stop_ids_and_max_new_tokens(ckpts):
  """The model emits </s> (2) at every step: the default stop ids (2, 1) end after it, the
  original's stop id 1 alone continues past it to max_new_tokens."""
  default = _generate(ckpts, 'two', f'--config.generate.max_new_tokens={NEW}')
  assert default['new_tokens'] == 1 and default['prediction'] == ''
  original = _generate(ckpts, 'two', f'--config.generate.max_new_tokens={NEW}',
                       '--config.generate.stop_ids=[1]')
  assert original['new_tokens'] == NEW and original['prediction'] == ''   # </s> decodes to ''
  shorter = _generate(ckpts, 'two', '--config.generate.max_new_tokens', '3',
                      '--config.generate.stop_ids', '[1]')                  # `--config.a.b v` form
  assert shorter['new_tokens'] == 3


def test_temperature_top_k_top_p_and_seed(ckpts):
  """At temperature 1 the logits (2 at </s>, 0 elsewhere over 512 ids) give </s> only ~1.4% of
  the time: sampled text appears; top_k=1 and top_p=0.01 keep only </s>, as greedy does."""
  base = [f'--config.generate.max_new_tokens={NEW}', '--config.generate.stop_ids=[1]',
          '--config.generate.temperature=1.0']
  sampled = _generate(ckpts, 'two', *base)
  assert sampled['new_tokens'] == NEW and sampled['prediction'] != ''
  assert _generate(ckpts, 'two', *base)['prediction'] == sampled['prediction']   # seeded
  other_seed = _generate(ckpts, 'two', *base, '--seed', '3')
  assert other_seed['prediction'] not in ('', sampled['prediction'])
  for flag in ('--config.generate.top_k=1', '--config.generate.top_p=0.01'):
    row = _generate(ckpts, 'two', *base, flag)
    assert row['new_tokens'] == NEW and row['prediction'] == '', flag


def _decode_program(dump: str) -> str:
  """The one decode program compiled while dumping to `dump` (StableHLO text)."""
  files = glob.glob(os.path.join(dump, '*_decode_loop*.mlir'))
  assert len(files) == 1, sorted(os.listdir(dump))
  with open(files[0]) as f:
    return f.read()


def _whiles(dump: str) -> int:
  """`while` loops in the one decode program compiled while dumping to `dump`."""
  return _decode_program(dump).count('stablehlo.while')


def test_cpu_product(ckpts, tmp_path):
  """generate.cpu_product from the command line: 'panels' calls the panel kernel for every
  decoder product (the decode program's custom calls), 'xla' none, and both give the same row."""
  rows, calls = {}, {}
  for product in ('panels', 'xla'):
    dump = str(tmp_path / product)
    rows[product] = _generate(ckpts, 'random', f'--config.generate.max_new_tokens={NEW}',
                              '--config.generate.stop_ids=[1]',
                              f'--config.generate.cpu_product={product}', dump=dump)
    calls[product] = _decode_program(dump).count(f'@{panel_kernel.TARGET}')
  assert rows['panels'] == rows['xla'] and rows['xla']['new_tokens'] == NEW
  assert calls['xla'] == 0 and calls['panels'] > 0


def test_layer_loop_and_cache_chunk(ckpts, tmp_path):
  """Same tokens whichever way the decoder layers run and the cache grows; the compiled decode
  program shows each setting: one more token loop per cache chunk (`cache_limits`), the scanned
  layer loop adds `while` loops over the layers that the unrolled one does not have."""
  runs = {}
  for loop, chunk in (('unrolled', 0), ('unrolled', 2), ('scan', 0)):
    dump = str(tmp_path / f'{loop}_{chunk}')
    runs[loop, chunk] = (_generate(ckpts, 'random', f'--config.generate.max_new_tokens={NEW}',
                                   '--config.generate.stop_ids=[1]',
                                   f'--config.generate.layer_loop={loop}',
                                   f'--config.generate.cache_chunk={chunk}', dump=dump),
                         _whiles(dump))
  rows = [row for row, _ in runs.values()]
  assert all(row == rows[0] for row in rows) and rows[0]['new_tokens'] == NEW
  assert rows[0]['prediction'] != ''
  prompt_len = 64                         # the prompt is left padded to a multiple of 64
  chunks = len(cache_limits(prompt_len, NEW, 2)) - len(cache_limits(prompt_len, NEW, 0))
  assert chunks == 2 and runs['unrolled', 2][1] - runs['unrolled', 0][1] == chunks
  assert runs['scan', 0][1] > runs['unrolled', 0][1]


@pytest.mark.parametrize('flag, field', [
    ('--config.generate.layer_loop=loop', 'generate.layer_loop'),
    ('--config.generate.cache_chunk=-1', 'generate.cache_chunk'),
    ('--config.generate.top_p=0', 'generate.top_p'),
    ('--config.generate.max_new_token=3', 'generate.max_new_token'),
    ('--config.model.llama.num_layers=3', 'only generate.* fields apply'),
])
def test_bad_generate_values_are_one_line_and_exit_2(ckpts, capsys, flag, field):
  rc = main(['generate', '--checkpoint', str(ckpts / 'two'), '--prompt', PROMPT, flag])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and field in err, err


def test_generate_config_sources(tmp_path):
  """Defaults, the training run's saved section, a config file, and overrides, in that order."""
  assert generate_config() == GenerateConfig()
  (tmp_path / 'config.json').write_text(json.dumps(
      {'model': {}, 'generate': {'max_new_tokens': 7, 'stop_ids': [1], 'old_field': 1}}))
  (tmp_path / 'checkpoints' / '3').mkdir(parents=True)
  saved = generate_config(str(tmp_path / 'checkpoints' / '3'))
  assert saved == GenerateConfig(max_new_tokens=7, stop_ids=(1,))
  assert generate_config(str(tmp_path), overrides=['generate.top_k=4']) == GenerateConfig(
      max_new_tokens=7, stop_ids=(1,), top_k=4)
  from_file = generate_config(str(tmp_path), 'configs/radfm.py:model=tiny',
                              ['generate.temperature=0.5'])
  assert from_file == GenerateConfig(temperature=0.5)
  with pytest.raises(ConfigError, match='only generate'):
    generate_config(str(tmp_path), overrides=['train.steps=3'])
  # with a config file too: a data or model override would be read and do nothing
  for other in ('model.llama.num_layers=3', 'data.intensity=percentile'):
    with pytest.raises(ConfigError, match=r"override '" + other + r"': only generate\.\* fields "
                       r'apply here .*--intensity'):
      generate_config(str(tmp_path), 'configs/radfm.py:model=tiny', [other])


class _Captured(Exception):
  pass


def test_the_api_and_the_cli_take_one_set_of_generate_defaults(ckpts, tmp_path, monkeypatch):
  """`radfm-jax generate` decodes with the run's saved generate section, else the config schema's
  generate defaults; the Python API (`generate` with no sampling arguments) with `GenerateConfig()`.
  Field by field those are one set (the schema, `config.defaults()`, is built from the dataclass),
  and the help text states them. For a run that saved its own section, `api.generate_config`
  gives a Python caller the command's settings: the same answer."""
  import dataclasses
  import shutil

  from radfm_jax.cli.generate import GENERATE_NOTE
  from radfm_jax.config import defaults
  from radfm_jax.infer import text
  model, tok, _ = api.load_for_generation(str(ckpts / 'random'), str(ckpts / 'tok.model'))
  used = []

  def capture(*args, sampling=None, **kwargs):
    used.append(sampling)
    raise _Captured

  monkeypatch.setattr(text, 'generate_ids', capture)
  with pytest.raises(_Captured):
    api.generate(model, tok, PROMPT)
  monkeypatch.undo()
  (api_default,) = used
  cli_default = generate_config(str(ckpts / 'random'))      # a saved model: no generate section
  schema = defaults().generate
  assert set(schema) == {f.name for f in dataclasses.fields(GenerateConfig)}
  for f in dataclasses.fields(GenerateConfig):
    want = getattr(GenerateConfig(), f.name)
    assert getattr(api_default, f.name) == want == getattr(cli_default, f.name), f.name
    assert schema[f.name] == (list(want) if isinstance(want, tuple) else want), f.name
  assert (f'{GenerateConfig().max_new_tokens} new tokens, stop_ids '
          f'{list(GenerateConfig().stop_ids)}') in GENERATE_NOTE
  assert GenerateConfig().temperature == 0.0 and 'greedy' in GENERATE_NOTE

  run = tmp_path / 'run'                 # a run that saved its own generate section
  shutil.copytree(ckpts / 'random', run)
  record = json.loads((run / 'config.json').read_text())
  record['generate'] = {'max_new_tokens': 3, 'stop_ids': [1]}
  (run / 'config.json').write_text(json.dumps(record))
  sampling = api.generate_config(str(run))
  assert sampling == dataclasses.replace(GenerateConfig(), max_new_tokens=3, stop_ids=(1,))
  cli = _generate(ckpts, str(run))
  assert cli['new_tokens'] == 3                                # not GenerateConfig()'s 200
  model, tok, data_cfg = api.load_for_generation(str(run), str(ckpts / 'tok.model'))
  assert api.generate(model, tok, PROMPT, data_cfg=data_cfg, sampling=sampling) == \
      cli['prediction']


def test_generate_config_bad_arguments_are_one_line(tmp_path):
  """Before: a string of overrides was read letter by letter ("override 'g'"), a folder that is
  not a checkpoint (or no folder) gave the defaults silently, None a TypeError."""
  from radfm_jax.errors import InputError
  with pytest.raises(ConfigError) as e:
    generate_config(overrides='generate.top_k=5')
  assert str(e.value) == ("overrides 'generate.top_k=5': expected a list of "
                          '"generate.field=value" strings')
  with pytest.raises(InputError) as e:
    generate_config(str(tmp_path / 'none'))
  assert str(e.value) == (f'{tmp_path}/none: not a checkpoint (no such folder); expected a '
                          'checkpoint folder written by radfm_jax.save, radfm-jax train or '
                          'radfm-jax convert')
  with pytest.raises(InputError) as e:
    api.load(None)
  assert str(e.value) == ('checkpoint: got NoneType None; expected a checkpoint folder written by '
                          'radfm_jax.save, radfm-jax train or radfm-jax convert (its path)')
  with pytest.raises(ConfigError, match=r"^config arg model='huge': expected one of \['bench'"):
    model_config('huge')
