"""The generate settings of a run: `cfg.generate` as a `GenerateConfig` for `generate_ids`.

    sampling = generate_config('runs/small', overrides=['generate.stop_ids=[1]'])
    sampling = generate_config('ckpt/', 'configs/radfm.py:model=small', ['generate.top_k=5'])

With a config spec the section comes from that config (its other sections are not used: the model
comes from the checkpoint). Without one it starts from the generate section saved with the
training run that wrote the checkpoint (its config.json), else the `GenerateConfig` defaults, and
only `generate.*` overrides apply. Values are validated by `load_config` (a bad one raises
`ConfigError` naming the field).
"""

from __future__ import annotations

from typing import Sequence

from radfm_jax.checkpoint import meta
from radfm_jax.config import (ConfigError, GenerateConfig, apply_overrides,
                              check_override_sections, load_config, validate, with_defaults)

def generate_config(checkpoint: str | None = None, spec: str | None = None,
                    overrides: Sequence[str] = ()) -> GenerateConfig:
  """The validated generate section for a checkpoint (see the module doc)."""
  overrides = () if overrides is None else overrides
  if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
    raise ConfigError(f'overrides {overrides!r}: expected a list of "generate.field=value" '
                      'strings')
  # Only the generate section is read (of a config file too): an override of another field
  # would be accepted and do nothing, so it is refused.
  check_override_sections(overrides, ('generate',), 'the model and the data settings come from '
                          'the checkpoint; the image intensity: --intensity')
  if spec:
    return load_config(spec, overrides).generate
  if checkpoint is not None:           # a checkpoint at all: else the defaults, silently
    meta.read_record(checkpoint)
  saved = meta.read_section(checkpoint, 'generate', GenerateConfig) if checkpoint else {}
  cfg = with_defaults({'generate': saved})
  return validate(apply_overrides(cfg, overrides)).generate
