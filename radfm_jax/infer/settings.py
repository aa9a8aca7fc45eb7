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
from radfm_jax.config import (ConfigError, GenerateConfig, apply_overrides, load_config, validate,
                              with_defaults)

def generate_config(checkpoint: str | None = None, spec: str | None = None,
                    overrides: Sequence[str] = ()) -> GenerateConfig:
  """The validated generate section for a checkpoint (see the module doc)."""
  if spec:
    return load_config(spec, overrides).generate
  other = [o for o in overrides if not o.strip().startswith('generate.')]
  if other:
    raise ConfigError(f'override {other[0]!r}: without a config file only generate.* fields '
                      'apply (the model comes from the checkpoint)')
  saved = meta.read_section(checkpoint, 'generate', GenerateConfig) if checkpoint else {}
  cfg = with_defaults({'generate': saved})
  return validate(apply_overrides(cfg, overrides)).generate
