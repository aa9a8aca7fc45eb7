"""`radfm-jax <command>`: the command-line layer (entry point `radfm_jax.cli.main:main`).

One module per command holds its argparse definition, messages and exit codes and calls library
functions; nothing outside this package defines arguments or reads sys.argv, and nothing imports
this package.
"""
