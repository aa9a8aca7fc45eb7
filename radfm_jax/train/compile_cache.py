"""The persistent JAX compilation cache of every command, and its hit / miss counts.

    directory = compile_cache.enable()    # before the first compile; None when turned off
    compile_cache.counts()                # {'hits': 2, 'misses': 0}: compiles this process
                                          # loaded from the cache / compiled and wrote to it

Where the cache lives, first match wins:
  1. $RADFM_COMPILATION_CACHE: a directory, or `off` (no persistent cache);
  2. $JAX_COMPILATION_CACHE_DIR (JAX's own variable) when set: left to JAX;
  3. $XDG_CACHE_HOME/radfm-jax/jax, else ~/.cache/radfm-jax/jax.
A rerun or a resumed run of the same config loads every executable it compiled before (a train
step of `tiny` takes ~30 s to compile on 2 CPU cores, a few ms to load). JAX caches only compiles
above a minimum time (1 s) and, on some backends, entry size: both are set to zero here, so the
small CPU programs are cached too. Entries are keyed by the program, devices, compile options and
jax / jaxlib versions, so a stale entry is never used; delete the folder to reclaim disk.
"""

from __future__ import annotations

import os

ENV = 'RADFM_COMPILATION_CACHE'
_COUNTS = {'hits': 0, 'misses': 0}
_EVENTS = {'/jax/compilation_cache/cache_hits': 'hits',
           '/jax/compilation_cache/cache_misses': 'misses'}   # a miss is recorded when written
_STATE = {'listening': False, 'directory': None}


def default_directory() -> str:
  """$XDG_CACHE_HOME/radfm-jax/jax, else ~/.cache/radfm-jax/jax."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'radfm-jax', 'jax')


def directory_from_env() -> str | None:
  """The cache directory the environment asks for (see the module doc); None = turned off."""
  given = os.environ.get(ENV, '').strip()
  if given.lower() in ('off', '0', 'false', 'none'):
    return None
  if given:
    return os.path.abspath(os.path.expanduser(given))
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  return default_directory()


def _count(event: str, **_kwargs):
  name = _EVENTS.get(event)
  if name:
    _COUNTS[name] += 1


def enable() -> str | None:
  """Turns the persistent cache on (process-wide; call before the first compile) and starts
  counting hits and misses. Returns the directory, or None when $RADFM_COMPILATION_CACHE=off."""
  import jax
  if not _STATE['listening']:
    jax.monitoring.register_event_listener(_count)
    _STATE['listening'] = True
  directory = directory_from_env()
  if directory is None:
    return None
  if '://' not in directory:
    os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)   # -1: no size minimum
  _STATE['directory'] = directory
  return directory


def directory() -> str | None:
  """The directory `enable()` turned on in this process (None: not enabled or off)."""
  return _STATE['directory']


def counts() -> dict:
  """{'hits', 'misses'} of the persistent cache in this process so far (a copy)."""
  return dict(_COUNTS)


__all__ = ['ENV', 'counts', 'default_directory', 'directory', 'directory_from_env', 'enable']
