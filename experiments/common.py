"""Small helpers shared by the experiment scripts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huginn_jax import checkpoint as converted
from huginn_jax.config import HuginnConfig
from huginn_jax.loading import load_hf_checkpoint

# The tiny reference model that ships with the repository: golden outputs of the official code.
DEFAULT_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "huginn-reference-tiny"


def load_checkpoint(path: str | os.PathLike[str], dtype: Any) -> tuple[HuginnConfig, dict]:
    """(config, params) of a Hugging Face layout folder or a converted (`python -m convert`) one."""
    if converted.is_checkpoint(path):
        return converted.restore(path, dtype=dtype)
    return load_hf_checkpoint(path, dtype=dtype)


def quiet_jax_logs() -> None:
    """absl shows INFO logs; JAX's backend probing (no TPU, no GPU) is noise at that level."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
