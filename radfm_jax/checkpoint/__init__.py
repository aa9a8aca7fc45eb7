"""Checkpoints: one package for both layouts, told apart by the `layout` field of config.json.

    model, cfg = checkpoint.load('ckpt/')             # either layout; `step=`, `mesh=`, `rules=`
    checkpoint.save(model, 'ckpt/')                   # layout "params": ckpt/config.json + params/
    ckpt = checkpoint.Checkpointer('run/checkpoints') # layout "train_state": TrainState, data
    ckpt.save(step, state, data_iter, config)         # iterator and config per step

Modules: `meta` (config.json: the layout record, the model / data config, the tokenizer),
`params` (parameter-only checkpoints, written slice by slice), `train_state` (the training
CheckpointManager), `read` (`locate`, `load`, `LeafReader`: either layout, parameters only).
"""

from radfm_jax.checkpoint.meta import (CONFIG_FILE, LAYOUT_VERSION, LAYOUTS, PARAMS, TRAIN_STATE,
                                       find_tokenizer, read_data_config, read_model_config)
from radfm_jax.checkpoint.params import IncrementalWriter, save, write_config
from radfm_jax.checkpoint.read import LeafReader, Location, load, locate
from radfm_jax.checkpoint.train_state import Checkpointer, read_step_config

__all__ = ['CONFIG_FILE', 'Checkpointer', 'IncrementalWriter', 'LAYOUTS', 'LAYOUT_VERSION',
           'LeafReader', 'Location', 'PARAMS', 'TRAIN_STATE', 'find_tokenizer', 'load', 'locate',
           'read_data_config', 'read_model_config', 'read_step_config', 'save', 'write_config']
