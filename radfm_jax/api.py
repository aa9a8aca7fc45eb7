"""The public face: load any checkpoint, save a model, generate text.

    model, cfg = load('ckpt/')            # converted (`radfm-jax convert`), saved or trained
    save(model, 'ckpt/')                  # layout "params": ckpt/config.json + ckpt/params/
    text = generate(model, tok, prompt='Is there a lesion? <image>', images=[vol])
    model, tok, data_cfg = load_for_generation('demo_out/train')   # + tokenizer, preprocessing
    sampling = generate_config('demo_out/train')   # decoding as `radfm-jax generate` decodes
    text = generate(model, tok, 'Any change? <image>', [vol], data_cfg=data_cfg, sampling=sampling)

Checkpoints are `radfm_jax.checkpoint`'s: `load` reads either layout (parameter-only, or a
training run's TrainState) as named by the `layout` field of its config.json; `save` writes the
parameter-only layout into a new folder, an empty one or a parameter-only checkpoint it replaces.
A path that is not a checkpoint (`load`) or cannot take one (`save`) is an `errors.InputError`,
one line naming the path and what was expected, as the commands print it.

Decoding settings have one schema, `config.GenerateConfig`: `generate` without `sampling` (or
its keyword arguments) uses its defaults, as does `radfm-jax generate` for a checkpoint whose run
saved no generate section; `generate_config(checkpoint)` is that command's choice for a checkpoint
(the run's saved section, else those defaults), so a caller can decode exactly as it does.
"""

from __future__ import annotations

# re-exported: the checkpoint package's public face
from radfm_jax.checkpoint import find_tokenizer, load, read_data_config, save  # noqa: F401
from radfm_jax.infer.settings import generate_config  # noqa: F401  (re-exported)
from radfm_jax.infer.text import generate, generate_batch  # noqa: F401  (re-exported)


def load_for_generation(directory: str, tokenizer: str | None = None, *, step: int | None = None,
                        intensity: str | None = None, mesh=None):
  """(model, Tokenizer, DataConfig) ready for `generate`: the checkpoint, its tokenizer (given or
  `find_tokenizer`), and the preprocessing of the run that trained it (image sizes, depth buckets,
  intensity policy; defaults for converted checkpoints) clamped to the vision tower."""
  import dataclasses

  from radfm_jax.config import DataConfig
  from radfm_jax.data.tokenizer import Tokenizer
  from radfm_jax.errors import InputError
  from radfm_jax.data.transforms import POLICIES
  from radfm_jax.infer.text import check_tokenizer, data_config_for
  if intensity is not None and intensity not in POLICIES:   # else a ValueError at the first image
    raise InputError(f'intensity {intensity!r}: expected one of {POLICIES} (None: the training '
                     "run's)")
  from radfm_jax.checkpoint import meta
  # a checkpoint at all, first: a folder that is not one would be told it has no tokenizer
  meta.read_record(directory)
  tokenizer = tokenizer or find_tokenizer(directory)
  if tokenizer is None:
    raise InputError(f'{directory}: no tokenizer found (neither the data.tokenizer of its '
                     'config.json nor a tokenizer.model beside it or above it); pass the '
                     'SentencePiece model it was trained with: --tokenizer PATH (Python: '
                     'tokenizer=PATH)')
  model, cfg = load(directory, step=step, mesh=mesh)
  tok = Tokenizer(tokenizer, max_images=cfg.max_images, num_latents=cfg.perceiver.num_latents,
                  source='tokenizer',   # the argument's name (the command checked its flag)
                  expected='expected the SentencePiece tokenizer.model the checkpoint was '
                  'trained with')
  check_tokenizer(tok, cfg)
  base = read_data_config(directory) or DataConfig()
  if intensity is not None:
    base = dataclasses.replace(base, intensity=intensity)
  return model, tok, data_config_for(cfg, base)


__all__ = ['find_tokenizer', 'generate', 'generate_batch', 'generate_config', 'load',
           'load_for_generation', 'read_data_config', 'save']
