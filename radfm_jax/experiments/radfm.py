"""The main experiment: `configs/radfm.py:model=tiny,mesh=cpu[,finetune=lora]` (or `radfm:...`).

`arg` is a comma list of `key=value` picking a model size and a hardware preset (both in
`radfm_jax/presets.py`); `get_config` returns only what differs from the dataclass defaults in
`radfm_jax/config.py`. Any field, listed here or not, can then be overridden with dotted flags
(`--config.model.llama.num_layers=4`, or `overrides=[...]` in `radfm_jax.config.load_config`).
Copy this file to start an experiment of your own and set fields on `cfg` below.
"""

import ml_collections

from radfm_jax import presets

PICKS = {'model': 'tiny', 'mesh': 'cpu', 'finetune': 'full'}


def parse_arg(arg, picks=PICKS):
  """`model=<size>,mesh=<preset>,finetune=<method>` -> {'model': ..., 'mesh': ..., 'finetune': ...}
  (unnamed keys from `picks`)."""
  picks = dict(picks)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in picks:
      raise ValueError(f'config arg {item!r}: expected model=<size>, mesh=<preset> or '
                       'finetune=<full|lora|qlora>')
    picks[key] = value
  return picks


def get_config(arg=''):
  picks = parse_arg(arg)
  cfg = ml_collections.ConfigDict(presets.select(picks['model'], picks['mesh'],
                                                 picks['finetune']))
  # e.g. cfg.train.learning_rate = 2e-5; cfg.data.manifest = 'store/manifest.jsonl'
  return cfg
