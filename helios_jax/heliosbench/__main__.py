"""`python -m helios_jax.heliosbench generate|metrics|merge` (see `helios_jax.heliosbench.cli`)."""

import sys

from helios_jax.heliosbench import cli

if __name__ == "__main__":
  sys.exit(cli.main())
