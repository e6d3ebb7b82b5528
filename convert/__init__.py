"""Checkpoint conversion between the Hugging Face / PyTorch layout and converted (Orbax) huginn-jax
checkpoints, in both directions, streaming one tensor at a time.

    python -m convert import --source=DIR_OR_HUB_ID --output=OUT [--dtype=bfloat16|float32] [--verify]
    python -m convert export --source=OUT --output=HF_DIR [--max_shard_size=5GB]

`huginn_jax.checkpoint.restore` loads a converted checkpoint onto a device or a device mesh.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ExportResult", "ImportResult", "export_checkpoint", "import_checkpoint"]
_HOMES = {"ExportResult": "convert.exporter", "export_checkpoint": "convert.exporter",
          "ImportResult": "convert.importer", "import_checkpoint": "convert.importer"}


def __getattr__(name: str) -> Any:
    """Imported on first use, so that `python -m convert` answers a usage error or a Ctrl-C during
    start-up itself, before JAX and Orbax are loaded."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
