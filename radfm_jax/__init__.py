"""radfm-jax: RadFM in JAX / Flax NNX.

    import radfm_jax
    model, cfg = radfm_jax.load('ckpt/')                 # converted or trained checkpoint
    tok = radfm_jax.Tokenizer('tokenizer.model')          # RadFM id layout
    text = radfm_jax.generate(model, tok, prompt='Is there a lesion? <image>', images=[volume])
"""

from radfm_jax.config import Config, ConfigError, load_config, model_config

__all__ = ['Config', 'ConfigError', 'Tokenizer', 'generate', 'generate_batch', 'generate_config',
           'load', 'load_config', 'load_for_generation', 'model_config', 'save']
__version__ = '0.1.0'

_LAZY = {
    'Tokenizer': 'radfm_jax.data.tokenizer',
    'load': 'radfm_jax.api', 'load_for_generation': 'radfm_jax.api', 'save': 'radfm_jax.api',
    'generate': 'radfm_jax.api', 'generate_batch': 'radfm_jax.api',
    'generate_config': 'radfm_jax.api',
}


def __getattr__(name):
  # Imported on first use so `import radfm_jax` (and the CLI's config checks) stay free of JAX.
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module radfm_jax has no attribute {name!r}')
