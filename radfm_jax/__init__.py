"""radfm-jax: RadFM in JAX / Flax NNX."""

from radfm_jax.config import Config, ConfigError, load_config, model_config

__all__ = ['Config', 'ConfigError', 'load_config', 'model_config']
__version__ = '0.1.0'
