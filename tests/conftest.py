"""Tests run on CPU with 8 fake devices (set before JAX initialises its backends)."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
