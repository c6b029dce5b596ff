"""Experiment configs (`get_config(arg)`) for `python -m helios_jax.train --config=...`."""
