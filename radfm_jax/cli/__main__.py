"""`python -m radfm_jax.cli <command>`: the same as the `radfm-jax` script."""

import sys

from radfm_jax.cli.main import main

sys.exit(main())
