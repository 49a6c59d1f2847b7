"""Test session setup: 4 virtual CPU devices for the multi-device paths (must precede importing jax)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
