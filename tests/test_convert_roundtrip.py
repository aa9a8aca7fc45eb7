"""torch -> Orbax -> torch through the CLI, restoring onto a mesh, dtype casts, HF LLaMA import."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
sys.path.insert(0, os.path.dirname(__file__))

from convert_fixtures import official_state_dict  # noqa: E402
from radfm_jax import checkpoint  # noqa: E402
from radfm_jax.cli.main import main  # noqa: E402
from radfm_jax.checkpoint.tree import flat_params  # noqa: E402
from radfm_jax.convert import api, engine, keymap  # noqa: E402
from radfm_jax.models.radfm import create_model  # noqa: E402


@pytest.fixture(scope='module')
def converted(tmp_path_factory, tiny_cfg):
  """The tiny official state dict saved as .bin and converted through the CLI."""
  root = tmp_path_factory.mktemp('convert')
  sd = official_state_dict(tiny_cfg, seed=3)
  torch.save(sd, root / 'pytorch_model.bin')
  rc = main(['convert', 'from-torch', '--checkpoint', str(root / 'pytorch_model.bin'),
             '--config', 'configs/radfm.py:model=tiny', '--out', str(root / 'ckpt')])
  assert rc == 0
  return root, sd


def test_restore_values_and_sharding(converted, tiny_cfg):
  root, sd = converted
  model, cfg = checkpoint.load(str(root / 'ckpt'))
  assert cfg == tiny_cfg
  # placed with the model's NamedShardings over every device (8 fake CPU devices in the tests)
  kernel = model.llama.layers.q.kernel[...]
  assert kernel.sharding.mesh.size == len(jax.devices())
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', None, None)
  # spot values through the official layout
  inner = cfg.vision.heads * cfg.vision.head_dim
  qkv = sd['embedding_layer.vision_encoder.transformer.layers.1.0.fn.to_qkv.weight'].numpy()
  np.testing.assert_array_equal(np.asarray(model.vision.blocks.v.kernel[...])[1].reshape(48, inner),
                                qkv[2 * inner:].T)
  kv = sd['embedding_layer.perceiver.layers.0.0.to_kv.weight'].numpy()
  pin = cfg.perceiver.heads * cfg.perceiver.head_dim
  np.testing.assert_array_equal(np.asarray(model.perceiver.layers.k.kernel[...])[0].reshape(48, pin),
                                kv[:pin].T)
  np.testing.assert_array_equal(np.asarray(model.figure_tokens[...]),
                                sd['embedding_layer.figure_token_weight'].numpy())
  np.testing.assert_array_equal(np.asarray(model.llama.lm_head.kernel[...]),
                                sd['lang_model.lm_head.weight'].numpy().T)
  # the whole tree equals an in-memory load through the same table
  ref = create_model(tiny_cfg, seed=9)
  engine.load_state_dict(ref, keymap.radfm_table(), sd, skip=keymap.RADFM_SKIP)
  got = flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  want = flat_params(nnx.to_pure_dict(nnx.state(ref, nnx.Param)))
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
  with open(root / 'ckpt' / 'config.json') as f:
    assert json.load(f)['model']['llama']['num_layers'] == tiny_cfg.llama.num_layers


def test_restored_model_runs(converted, tiny_cfg):
  root, _ = converted
  model, cfg = checkpoint.load(str(root / 'ckpt'))
  tokens = jnp.array([[1, 5, cfg.llama.vocab_size, cfg.image_token_offset, 7]])
  images = jnp.ones((1, 1, 3, 32, 32, 8), jnp.float32) * 0.5
  logits = model(tokens, images)
  assert logits.shape == (1, 5, cfg.llama.vocab_size)
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize('suffix', ['bin', 'safetensors'])
def test_to_torch_bit_exact(converted, suffix):
  root, sd = converted
  out = root / f'new_{suffix}' / 'sub' / f'back.{suffix}'      # folders that do not exist yet
  assert main(['convert', 'to-torch', '--checkpoint', str(root / 'ckpt'), '--out', str(out)]) == 0
  if suffix == 'bin':
    back = torch.load(out, weights_only=True)
    # the shared embedding is one storage, as in the original model
    assert back['embedding_layer.weight'].data_ptr() == \
        back['lang_model.model.embed_tokens.weight'].data_ptr()
    back = {k: v.numpy() for k, v in back.items()}
  else:
    from safetensors.numpy import load_file
    back = load_file(str(out))
  kept = {k for k in sd if not keymap.is_skipped(k, keymap.RADFM_SKIP)}
  assert set(back) == kept                             # no dead-branch keys, alias included
  for key in kept:
    assert back[key].dtype == np.float32, key
    np.testing.assert_array_equal(back[key], sd[key].numpy(), err_msg=key)


def test_safetensors_input_and_bfloat16(tmp_path, tiny_cfg):
  from safetensors.torch import save_file
  sd = official_state_dict(tiny_cfg, seed=4, keep_dead=False)
  # safetensors refuses shared storage: drop the alias (it is optional when reading)
  save_file({k: v.contiguous() for k, v in sd.items() if k != 'embedding_layer.weight'},
            str(tmp_path / 'model.safetensors'))
  cfg = api.from_torch(str(tmp_path / 'model.safetensors'), str(tmp_path / 'ck'), tiny_cfg,
                       dtype='bfloat16')
  assert cfg.param_dtype == 'bfloat16'
  leaf = checkpoint.LeafReader(str(tmp_path / 'ck'))
  gate = leaf('llama/layers/gate/kernel')
  assert gate.dtype == jnp.bfloat16
  want = sd['lang_model.model.layers.1.mlp.gate_proj.weight'].numpy().T.astype(jnp.bfloat16)
  np.testing.assert_array_equal(gate[1], want)
  api.to_torch(str(tmp_path / 'ck'), str(tmp_path / 'back.bin'))
  back = torch.load(tmp_path / 'back.bin', weights_only=True)
  assert back['lang_model.lm_head.weight'].dtype == torch.bfloat16
  np.testing.assert_array_equal(back['lang_model.lm_head.weight'].float().numpy(),
                                sd['lang_model.lm_head.weight'].to(torch.bfloat16).float().numpy())


def test_from_hf_llama(tmp_path, tiny_cfg):
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
      intermediate_size=96, vocab_size=300, rms_norm_eps=1e-5, rope_theta=5000.0,
      max_position_embeddings=256, tie_word_embeddings=False, attn_implementation='eager')
  hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  hf.save_pretrained(tmp_path / 'hf', safe_serialization=True, max_shard_size='100KB')
  assert len([f for f in os.listdir(tmp_path / 'hf') if f.endswith('.safetensors')]) > 1
  rc = main(['convert', 'from-hf-llama', '--hf', str(tmp_path / 'hf'), '--config',
             'configs/radfm.py:model=tiny', '--out', str(tmp_path / 'ck'), '--seed', '5'])
  assert rc == 0
  model, cfg = checkpoint.load(str(tmp_path / 'ck'))
  l = cfg.llama
  assert (l.num_layers, l.num_heads, l.vocab_size, l.intermediate_size) == (3, 2, 300, 96)
  assert (l.rms_norm_eps, l.rope_theta, l.max_position_embeddings) == (1e-5, 5000.0, 256)
  assert cfg.vision == tiny_cfg.vision
  # decoder: HF logits
  ids = np.random.default_rng(0).integers(0, 300, size=(1, 9))
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
  logits, _ = model.llama(model.llama.embed(jnp.asarray(ids)), jnp.arange(9)[None],
                          jnp.ones((1, 9), jnp.int32))
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)
  # towers: exactly what create_model(cfg, seed) draws
  fresh = create_model(cfg, seed=5)
  for a, b in [(model.vision.blocks.q.kernel, fresh.vision.blocks.q.kernel),
               (model.perceiver.latents, fresh.perceiver.latents),
               (model.fc.kernel, fresh.fc.kernel), (model.figure_tokens, fresh.figure_tokens)]:
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


def test_small_slabs_write_the_same_checkpoint(converted, tmp_path, tiny_cfg):
  """Row slabs far smaller than a tensor (several per head, fused parts at their row offsets) give
  exactly the checkpoint of whole-tensor conversion, with one zarr chunk per slab."""
  root, _ = converted
  api.from_torch(str(root / 'pytorch_model.bin'), str(tmp_path / 'ck'), tiny_cfg, block_bytes=700)
  whole = checkpoint.LeafReader(str(root / 'ckpt'))
  slabs = checkpoint.LeafReader(str(tmp_path / 'ck'))
  for path in whole.shapes():
    np.testing.assert_array_equal(slabs(path), whole(path), err_msg=path)
  with open(tmp_path / 'ck' / 'params' / 'llama.layers.q.kernel' / '.zarray') as f:
    assert json.load(f)['chunks'] == [1, 64, 1, 16]          # one layer, one head per chunk
  with open(tmp_path / 'ck' / 'params' / 'llama.embed_tokens' / '.zarray') as f:
    assert json.load(f)['chunks'] == [2, 64]                 # 2 rows of 256 bytes <= 700


def test_trained_checkpoint_exports(tmp_path, tiny_cfg):
  """A training checkpoint as the training Checkpointer writes it (Orbax's own OCDBT layout:
  workdir/checkpoints/<step>/state holding {step, params: nnx.State, ...}) loads and exports."""
  from radfm_jax.checkpoint.meta import config_to_dict
  model = create_model(tiny_cfg, seed=2)
  tree = {'step': np.int32(7), 'params': nnx.state(model, nnx.Param), 'opt_state': {}}
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), async_save=False)
  ckpt.save(7, tree, config={'model': config_to_dict(tiny_cfg)})
  ckpt.close()
  with open(tmp_path / 'run' / 'checkpoints' / '7' / 'state' / '_METADATA') as f:
    assert json.load(f)['use_ocdbt']
  leaf = checkpoint.LeafReader(str(tmp_path / 'run'))
  assert leaf._tensorstore('llama/layers/gate/kernel') is not None     # sliced read, not restore
  np.testing.assert_array_equal(leaf('llama/layers/gate/kernel', 1),
                                np.asarray(model.llama.layers.gate.kernel[...])[1])
  keys = api.to_torch(str(tmp_path / 'run'), str(tmp_path / 'out.safetensors'))
  from safetensors.numpy import load_file
  back = load_file(str(tmp_path / 'out.safetensors'))
  assert set(back) == set(keys)
  want = engine.state_dict_of(model, keymap.radfm_table())
  for key, value in want.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  restored, cfg = checkpoint.load(str(tmp_path / 'run'))
  np.testing.assert_array_equal(np.asarray(restored.perceiver.latents[...]),
                                np.asarray(model.perceiver.latents[...]))


def test_damaged_or_mislabelled_checkpoint_does_not_export(converted, tmp_path, capsys):
  """`to-torch` read leaves straight from TensorStore, which fills a missing chunk file with the
  fill value: a checkpoint with a chunk deleted exported zeros (exit 0). A config.json that does
  not match the stored tree (one layer fewer) exported a model without its last layer. Each is
  now one line naming the file or the leaf, and nothing is written."""
  import shutil
  root, _ = converted
  lost = tmp_path / 'lost'
  shutil.copytree(root / 'ckpt', lost)
  chunks = sorted((lost / 'params' / 'llama.norm.scale').glob('[0-9]*'))
  assert chunks, os.listdir(lost / 'params' / 'llama.norm.scale')
  os.remove(chunks[0])
  out = tmp_path / 'out.safetensors'
  assert main(['convert', 'to-torch', '--checkpoint', str(lost), '--out', str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f'llama.norm.scale/{chunks[0].name}" is missing' in err[0], err
  assert not out.exists()
  relabelled = tmp_path / 'relabelled'
  shutil.copytree(root / 'ckpt', relabelled)
  config = json.loads((relabelled / 'config.json').read_text())
  layers = config['model']['llama']['num_layers']
  config['model']['llama']['num_layers'] = layers - 1
  (relabelled / 'config.json').write_text(json.dumps(config))
  assert main(['convert', 'to-torch', '--checkpoint', str(relabelled), '--out', str(out)]) == 2
  (err,) = capsys.readouterr().err.strip().splitlines()
  assert f'is stored as [{layers}, ' in err, err
  assert f'the config.json beside it makes it [{layers - 1}, ' in err, err
  assert 'expected the config the checkpoint was written with' in err, err
  assert not out.exists()
  not_one = tmp_path / 'model.bin'                   # the wrong direction: was a traceback
  not_one.write_bytes(b'PK')
  assert main(['convert', 'to-torch', '--checkpoint', str(not_one), '--out', str(out)]) == 2
  assert capsys.readouterr().err.startswith(f'radfm-jax convert: {not_one}: not a checkpoint')


def test_hf_folder_that_disagrees_with_its_index_or_config_is_refused(tmp_path, capsys):
  """The shard folder's `model.safetensors.index.json` and `config.json` name what the shards must
  hold: a deleted shard converted into a model with fewer layers (the sizes are read from the keys
  present) and contradicting config sizes were ignored. Each is one line now."""
  import shutil
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
      intermediate_size=96, vocab_size=300, tie_word_embeddings=False)
  transformers.LlamaForCausalLM(hf_cfg).save_pretrained(
      tmp_path / 'hf', safe_serialization=True, max_shard_size='100KB')
  capsys.readouterr()                                    # transformers' progress bar
  index = json.loads((tmp_path / 'hf' / 'model.safetensors.index.json').read_text())
  layer2 = index['weight_map']['model.layers.2.mlp.gate_proj.weight']

  def convert(folder):
    rc = main(['convert', 'from-hf-llama', '--hf', str(folder), '--config',
               'configs/radfm.py:model=tiny', '--out', str(tmp_path / 'ck')])
    return rc, capsys.readouterr().err.strip().splitlines()

  cut = tmp_path / 'cut'
  shutil.copytree(tmp_path / 'hf', cut)
  os.remove(cut / layer2)
  assert convert(cut) == (2, [
      f'radfm-jax convert: {cut}/model.safetensors.index.json field weight_map: names shard '
      f'{layer2}, which is not in {cut}; expected every shard it lists (a download cut short?)'])
  os.remove(cut / 'model.safetensors.index.json')       # no index: config.json still counts
  kept = [k for k, shard in index['weight_map'].items()
          if k.endswith('gate_proj.weight') and shard != layer2]
  assert convert(cut) == (2, [
      f'radfm-jax convert: {cut}/config.json field num_hidden_layers: 3, but the shards hold '
      f'{len(kept)}; expected the config of these weights (a shard missing?)'])
  other = tmp_path / 'other'
  shutil.copytree(tmp_path / 'hf', other)
  config = json.loads((other / 'config.json').read_text())
  config['max_position_embeddings'] = 2047.9                # was: cut to 2047
  (other / 'config.json').write_text(json.dumps(config))
  assert convert(other) == (2, [f'radfm-jax convert: {other}/config.json field '
                                'max_position_embeddings: 2047.9; expected a finite integer'])
  assert not (tmp_path / 'ck').exists()
