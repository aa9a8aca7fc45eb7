"""The public face: load any checkpoint, save a model, generate text.

    model, cfg = load('ckpt/')            # converted (`radfm-jax convert`) or trained (`radfm-jax train`)
    save(model, 'ckpt/')                  # the converted layout: ckpt/config.json + ckpt/params/
    text = generate(model, tok, prompt='Is there a lesion? <image>', images=[vol])
    model, tok, data_cfg = load_for_generation('demo_out/train')   # + tokenizer, preprocessing

Two checkpoint layouts exist and `load` tells them apart from the Orbax tree metadata:

  * converted: `DIR/params/` holds `nnx.to_pure_dict(params)` (leaves `llama/embed_tokens`, ...),
    `DIR/config.json` is `{'model': {...}}`. Read by `radfm_jax.convert.store.load_checkpoint`.
  * trained: `WORKDIR/checkpoints/<step>/state/` holds a TrainState {step, params, opt_state} whose
    params are an `nnx.State` (leaves end in `.../value`), `WORKDIR/config.json` is the full run
    config.
"""

from __future__ import annotations

import json
import os

from radfm_jax.infer.text import generate, generate_batch  # noqa: F401  (re-exported)

CONVERTED, TRAINED = 'converted', 'trained'


def resolve_checkpoint(directory: str, step: int | None = None) -> str:
  """A run's workdir -> its `checkpoints/` folder; `step` picks `<dir>/<step>` over the latest."""
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, 'checkpoints')) and not os.path.isdir(
      os.path.join(directory, 'params')):
    directory = os.path.join(directory, 'checkpoints')
  if step is not None:
    path = os.path.join(directory, str(step))
    if not os.path.isdir(path):
      raise FileNotFoundError(f'{directory}: no step {step} (steps: '
                              f'{sorted(int(n) for n in os.listdir(directory) if n.isdigit())})')
    return path
  return directory


def checkpoint_layout(params_directory: str) -> str:
  """CONVERTED or TRAINED for an Orbax PyTree folder (the one `params_dir` returns)."""
  with open(os.path.join(params_directory, '_METADATA')) as f:
    tree = json.load(f)['tree_metadata']
  keys = [v['key_metadata'] for v in tree.values()]
  # nnx.State leaves are saved as {'value': array}: a trained TrainState's params.
  if any(k and k[-1]['key'] == 'value' for k in keys):
    return TRAINED
  return CONVERTED


def load(directory: str, *, step: int | None = None, mesh=None, rules=None):
  """Any Orbax checkpoint -> (RadFM model, ModelConfig), parameters sharded over the devices.

  directory: a converted checkpoint, a training workdir, its `checkpoints/` folder or one step
  folder; step: a training step (default the latest). mesh: default one `fsdp` axis over every
  device (`sharding.make_mesh(MeshConfig())`). Only parameters are read (never optimizer
  moments), straight into their shardings, by `convert.store.load_checkpoint` (both layouts).
  """
  from radfm_jax.convert import store
  return store.load_checkpoint(resolve_checkpoint(directory, step), mesh=mesh, rules=rules)


def read_data_config(directory: str):
  """The DataConfig of the run that wrote a checkpoint (its config.json 'data' section: image sizes,
  depth buckets, intensity policy), or None for a converted checkpoint (which records none)."""
  import dataclasses

  from radfm_jax.config import DataConfig
  probe = resolve_checkpoint(directory)
  while True:
    path = os.path.join(probe, 'config.json')
    if os.path.exists(path):
      break
    parent = os.path.dirname(probe)
    if parent == probe:
      return None
    probe = parent
  with open(path) as f:
    section = json.load(f).get('data')
  if not isinstance(section, dict):
    return None
  fields = {f.name for f in dataclasses.fields(DataConfig)}

  def tuples(v):
    return tuple(tuples(x) for x in v) if isinstance(v, list) else v
  return DataConfig(**{k: tuples(v) for k, v in section.items() if k in fields})


def find_tokenizer(directory: str) -> str | None:
  """The tokenizer of a checkpoint: the run config's `data.tokenizer` if that file exists, else a
  `tokenizer.model` in the checkpoint folder or any parent (the demo keeps it beside `train/`)."""
  probe = resolve_checkpoint(directory)
  while True:
    config = os.path.join(probe, 'config.json')
    if os.path.exists(config):
      with open(config) as f:
        given = (json.load(f).get('data') or {}).get('tokenizer')
      if given and os.path.isfile(given):
        return given
    candidate = os.path.join(probe, 'tokenizer.model')
    if os.path.isfile(candidate):
      return candidate
    parent = os.path.dirname(probe)
    if parent == probe:
      return None
    probe = parent


def load_for_generation(directory: str, tokenizer: str | None = None, *, step: int | None = None,
                        intensity: str | None = None, mesh=None):
  """(model, Tokenizer, DataConfig) ready for `generate`: the checkpoint, its tokenizer (given or
  `find_tokenizer`), and the preprocessing of the run that trained it (image sizes, depth buckets,
  intensity policy; defaults for converted checkpoints) clamped to the vision tower."""
  import dataclasses

  from radfm_jax.config import DataConfig
  from radfm_jax.data.tokenizer import Tokenizer
  from radfm_jax.infer.text import check_tokenizer, data_config_for
  tokenizer = tokenizer or find_tokenizer(directory)
  if tokenizer is None:
    raise FileNotFoundError(f'{directory}: no tokenizer.model found beside the checkpoint; pass '
                            'the SentencePiece model the checkpoint was trained with')
  model, cfg = load(directory, step=step, mesh=mesh)
  tok = Tokenizer(tokenizer, max_images=cfg.max_images, num_latents=cfg.perceiver.num_latents)
  check_tokenizer(tok, cfg)
  base = read_data_config(directory) or DataConfig()
  if intensity:
    base = dataclasses.replace(base, intensity=intensity)
  return model, tok, data_config_for(cfg, base)


def save(model, directory: str, **info) -> str:
  """Writes `model`'s parameters in the converted layout (`DIR/params/` + `DIR/config.json`) with
  the converter's own writer, so `load` and `radfm-jax convert to-torch` read it back."""
  import numpy as np
  from flax import nnx

  from radfm_jax.convert import engine, store
  flat = engine.flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  leaves = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat.items()}
  writer = store.IncrementalWriter(os.path.join(directory, store.PARAMS_DIR), leaves)
  for path, value in flat.items():
    writer.write(path, None, np.asarray(value))
  writer.close()
  store.write_config(directory, model.cfg, **info)
  return os.path.abspath(directory)


__all__ = ['load', 'load_for_generation', 'find_tokenizer', 'save', 'read_data_config', 'generate', 'generate_batch', 'checkpoint_layout', 'resolve_checkpoint']
