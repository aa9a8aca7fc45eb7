"""The built-in experiment files (`radfm`, `demo`), shipped in the wheel.

They are loaded by path (`radfm_jax.config.load_config('radfm:model=tiny')`), never imported as
modules; `configs/` at the top of the repository holds identical copies for users to copy and edit.
"""
