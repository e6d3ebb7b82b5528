"""Small helpers shared by the experiment scripts."""

from __future__ import annotations

import logging


def quiet_jax_logs() -> None:
    """absl shows INFO logs; JAX's backend probing (no TPU, no GPU) is noise at that level."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
