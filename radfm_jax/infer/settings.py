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

import dataclasses
import json
import os
from typing import Sequence

from radfm_jax.config import ConfigError, GenerateConfig, load_config

BASE_SPEC = 'configs/radfm.py'   # carries the generate section through load_config's validation


def saved_generate_section(directory: str) -> dict:
  """The 'generate' section of the run config (config.json) in `directory` or its parents;
  {} for a converted checkpoint or a run saved before the section existed."""
  probe = os.path.abspath(directory)
  while True:
    path = os.path.join(probe, 'config.json')
    if os.path.exists(path):
      with open(path) as f:
        section = json.load(f).get('generate')
      names = {f.name for f in dataclasses.fields(GenerateConfig)}
      return {k: v for k, v in (section or {}).items() if k in names}
    parent = os.path.dirname(probe)
    if parent == probe:
      return {}
    probe = parent


def generate_config(checkpoint: str | None = None, spec: str | None = None,
                    overrides: Sequence[str] = ()) -> GenerateConfig:
  """The validated generate section for a checkpoint (see the module doc)."""
  if spec:
    return load_config(spec, overrides).generate
  other = [o for o in overrides if not o.strip().startswith('generate.')]
  if other:
    raise ConfigError(f'override {other[0]!r}: without a config file only generate.* fields '
                      'apply (the model comes from the checkpoint)')
  section = dataclasses.asdict(GenerateConfig())
  section.update(saved_generate_section(checkpoint) if checkpoint else {})
  base = [f'generate.{k}={v!r}' for k, v in section.items()]
  return load_config(BASE_SPEC, base + list(overrides)).generate
