"""Checkpoint conversion between the Hugging Face / PyTorch layout and converted (Orbax) huginn-jax
checkpoints, in both directions, streaming one tensor at a time.

    python -m convert import --source=DIR_OR_HUB_ID --output=OUT [--dtype=bfloat16|float32] [--verify]
    python -m convert export --source=OUT --output=HF_DIR [--max_shard_size=5GB]

`huginn_jax.checkpoint.restore` loads a converted checkpoint onto a device or a device mesh.
"""

from convert.exporter import ExportResult, export_checkpoint
from convert.importer import ImportResult, import_checkpoint

__all__ = ["ExportResult", "ImportResult", "export_checkpoint", "import_checkpoint"]
