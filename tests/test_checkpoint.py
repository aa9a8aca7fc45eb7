"""radfm_jax.checkpoint: both layouts through one `load`, the layout record in config.json, its
errors, the previous release's layouts, steps, and restoring onto another mesh."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))

from radfm_jax import checkpoint, sharding  # noqa: E402
from radfm_jax.config import MeshConfig, load_config  # noqa: E402
from radfm_jax.errors import InputError  # noqa: E402
from radfm_jax.models.radfm import create_model  # noqa: E402
from radfm_jax.train import optim  # noqa: E402
from radfm_jax.train.step import init_train_state  # noqa: E402

RUN = 'configs/radfm.py:model=tiny,mesh=cpu'


def _params(model) -> dict:
  """Parameter path -> numpy array."""
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


def _assert_same(got: dict, want: dict):
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _save_run(workdir, models: dict, run_cfg):
  """A training run's checkpoints/: one TrainState per {step: model}, as the loop saves them."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  for step, model in models.items():
    params = nnx.state(model, nnx.Param)
    state = init_train_state(params, optim.make_optimizer(run_cfg.train, params))
    ckpt.save(step, state, config=run_cfg.to_dict())
  ckpt.close()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """One tiny model saved both ways, and a second model as a later training step."""
  root = tmp_path_factory.mktemp('ckpt')
  run_cfg = load_config(RUN, ['data.image_size_2d=32'])
  model, later = create_model(run_cfg.model, seed=1), create_model(run_cfg.model, seed=2)
  checkpoint.save(model, str(root / 'params'), note='test')
  _save_run(str(root / 'run'), {3: model, 7: later}, run_cfg)
  return root, model, later


def _read(path) -> dict:
  with open(path) as f:
    return json.load(f)


def test_layout_is_written_into_config_json(saved):
  root, model, _ = saved
  params = _read(root / 'params' / 'config.json')
  assert (params['layout'], params['layout_version']) == ('params', checkpoint.LAYOUT_VERSION)
  assert params['note'] == 'test' and params['model']['llama']['num_layers'] == \
      model.cfg.llama.num_layers
  run = _read(root / 'run' / 'checkpoints' / 'config.json')
  assert (run['layout'], run['layout_version']) == ('train_state', checkpoint.LAYOUT_VERSION)
  assert run['data']['image_size_2d'] == 32 and run['model']['size'] == 'tiny'
  assert checkpoint.read_step_config(str(root / 'run' / 'checkpoints'), 3) == \
      checkpoint.read_step_config(str(root / 'run' / 'checkpoints'))


def test_both_layouts_load_the_same_parameters(saved):
  root, model, later = saved
  want = _params(model)
  from_params, cfg = checkpoint.load(str(root / 'params'))
  assert cfg == model.cfg
  _assert_same(_params(from_params), want)
  run = root / 'run'
  for where, step in ((run, 3), (run / 'checkpoints', 3), (run / 'checkpoints' / '3', None),
                      (run / 'checkpoints' / '3', 3)):
    loaded, cfg = checkpoint.load(str(where), step=step)
    assert cfg == model.cfg
    _assert_same(_params(loaded), want)
  for where in (run, run / 'checkpoints', run / 'checkpoints' / '7'):    # latest: step 7
    _assert_same(_params(checkpoint.load(str(where))[0]), _params(later))
  kernel = from_params.llama.layers.q.kernel[...]
  assert kernel.sharding.mesh.size == len(jax.devices())
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', None, None)


def test_leaf_reader_reads_both_layouts(saved):
  root, model, later = saved
  gate = np.asarray(model.llama.layers.gate.kernel[...])
  for reader in (checkpoint.LeafReader(str(root / 'params')),
                 checkpoint.LeafReader(str(root / 'run'), step=3)):
    assert reader.cfg == model.cfg
    np.testing.assert_array_equal(reader('llama/layers/gate/kernel', 1), gate[1])
    np.testing.assert_array_equal(reader('figure_tokens'), np.asarray(model.figure_tokens[...]))
  latest = checkpoint.LeafReader(str(root / 'run'))
  assert latest.location.step == 7
  np.testing.assert_array_equal(latest('llama/lm_head/kernel'),
                                np.asarray(later.llama.lm_head.kernel[...]))


def test_restore_onto_another_mesh(saved):
  root, model, _ = saved
  mesh = sharding.make_mesh(MeshConfig(ici=(('data', 2), ('fsdp', 2), ('tensor', 2))))
  rules = sharding.LOGICAL_RULES['fsdp_tp']
  want = _params(model)
  for where, step in ((root / 'params', None), (root / 'run', 3)):
    loaded, _ = checkpoint.load(str(where), step=step, mesh=mesh, rules=rules)
    _assert_same(_params(loaded), want)
    lm_head = loaded.llama.lm_head.kernel[...]
    assert dict(lm_head.sharding.mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
    assert lm_head.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')


def test_missing_or_unknown_layout_is_an_error(saved, tmp_path):
  root = saved[0]
  bare = tmp_path / 'bare'
  shutil.copytree(root / 'params' / 'params', bare / 'params')      # an Orbax tree, no config.json
  with pytest.raises(InputError) as e:
    checkpoint.load(str(bare))
  # (params/ alone: what a save killed before its config.json, the commit, leaves)
  assert str(e.value) == (f'{bare}: not a checkpoint ({bare / "config.json"}: not found, only '
                          'what a save that did not finish left there); expected a checkpoint '
                          'folder written by radfm_jax.save, radfm-jax train or radfm-jax convert '
                          '(a config.json with "layout": one of [\'params\', \'train_state\'])')
  odd = tmp_path / 'odd'
  shutil.copytree(root / 'params', odd)
  record = _read(odd / 'config.json')
  for changes, message in (({'layout': 'pytorch'}, r'"layout" is \'pytorch\', expected one of'),
                           ({'layout_version': 99}, '"layout_version" is 99, expected 1')):
    with open(odd / 'config.json', 'w') as f:
      json.dump({**record, **changes}, f)
    with pytest.raises(ValueError, match=f'{odd / "config.json"}: {message}'):
      checkpoint.load(str(odd))
  # a step the checkpoint lacks: an InputError (one line from the API; a command prefixes its
  # flag), still the FileNotFoundError / ValueError it was before
  with pytest.raises(InputError, match='has no step 3') as e:
    checkpoint.load(str(root / 'params'), step=3)
  assert isinstance(e.value, ValueError)
  with pytest.raises(InputError, match='no step 5 \\(steps: \\[3, 7\\]\\)') as e:
    checkpoint.load(str(root / 'run'), step=5)
  assert isinstance(e.value, FileNotFoundError)
  with pytest.raises(InputError, match='is step 3, but step=7'):
    checkpoint.load(str(root / 'run' / 'checkpoints' / '3'), step=7)
  with pytest.raises(InputError) as e:
    checkpoint.load(str(tmp_path / 'nowhere'))
  assert str(e.value) == (f'{tmp_path}/nowhere: not a checkpoint (no such folder); expected a '
                          'checkpoint folder written by radfm_jax.save, radfm-jax train or '
                          'radfm-jax convert')


def test_a_tree_without_its_metadata_is_refused_by_load_and_leaf_reader(saved, tmp_path, capsys):
  """Orbax writes `_METADATA` with every tree. `load` read a parameter-only checkpoint without
  it (and so could not check for stored parameters the config does not describe) while
  `LeafReader` (convert to-torch) refused it: both now refuse it with the same one line, for
  both layouts; a `_METADATA` that does not parse likewise."""
  from radfm_jax.checkpoint.train_state import CheckpointRestoreError
  from radfm_jax.cli.main import main
  root = saved[0]
  params, run = tmp_path / 'params', tmp_path / 'run'
  shutil.copytree(root / 'params', params)
  shutil.copytree(root / 'run', run)
  gone = params / 'params' / '_METADATA'
  os.remove(gone)
  cut = run / 'checkpoints' / '7' / 'state' / '_METADATA'
  cut.write_text('{"tree_metadata": {')
  want = {params: f'checkpoint: {gone}: missing; expected the tree metadata Orbax writes with '
                  'every checkpoint (was it completely written or copied?)',
          run: f'checkpoint step 7: {cut}: does not parse (Expecting property name enclosed in '
               'double quotes: line 1 column 20 (char 19))'}
  for folder, message in want.items():
    for read in (checkpoint.load, checkpoint.LeafReader):
      with pytest.raises(CheckpointRestoreError) as e:
        read(str(folder))
      assert str(e.value) == message
  out = tmp_path / 'exported.safetensors'
  assert main(['convert', 'to-torch', '--checkpoint', str(params), '--out', str(out)]) == 2
  assert capsys.readouterr().err.strip() == f'radfm-jax convert: {want[params]}'
  assert not out.exists()
  _assert_same(_params(checkpoint.load(str(run), step=3)[0]), _params(saved[1]))   # intact step


def test_previous_release_layouts_load(saved, tmp_path):
  """config.json without "layout" (the previous release): params/ beside it is a parameter-only
  checkpoint; checkpoints/ beside it a training workdir whose config.json sat in the workdir."""
  root, model, later = saved
  old = tmp_path / 'old_params'
  shutil.copytree(root / 'params', old)
  record = {k: v for k, v in _read(old / 'config.json').items()
            if k not in ('layout', 'layout_version')}
  with open(old / 'config.json', 'w') as f:
    json.dump(record, f)
  _assert_same(_params(checkpoint.load(str(old))[0]), _params(model))
  run = tmp_path / 'old_run'
  shutil.copytree(root / 'run', run)
  run_record = _read(run / 'checkpoints' / 'config.json')
  os.remove(run / 'checkpoints' / 'config.json')
  with open(run / 'config.json', 'w') as f:
    json.dump({k: v for k, v in run_record.items() if k not in ('layout', 'layout_version')}, f)
  for where, step, want in ((run, None, later), (run / 'checkpoints' / '3', None, model),
                            (run / 'checkpoints', 3, model)):
    _assert_same(_params(checkpoint.load(str(where), step=step)[0]), _params(want))
  neither = tmp_path / 'neither'
  neither.mkdir()
  with open(neither / 'config.json', 'w') as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match=f'{neither / "config.json"}: no "layout" field'):
    checkpoint.load(str(neither))
