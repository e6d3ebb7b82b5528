"""Loading a model from a checkpoint folder of either layout, with its tokenizer.

`load_model(path)` takes a converted checkpoint (`python -m convert import`: `huginn_jax.json`,
`params/`) or a Hugging Face layout folder (`config.json` with `model.safetensors` or shards), and
says clearly what is wrong with anything else; `load_model_and_tokenizer` adds the folder's
tokenizer and checks that it belongs to the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huginn_jax import checkpoint
from huginn_jax.config import HuginnConfig
from huginn_jax.loading import INDEX_FILE, SINGLE_FILE, CheckpointError, load_hf_checkpoint
from huginn_jax.tokenizer import Tokenizer, check_vocab, load_tokenizer

Params = dict[str, Any]


def load_model(path: str | os.PathLike[str], dtype: Any = None) -> tuple[HuginnConfig, Params]:
    """(config, params) of a converted or Hugging Face layout checkpoint folder, in `dtype` (default:
    the stored dtype of a converted checkpoint, float32 for a Hugging Face folder)."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(os.fspath(path), ["does not exist"])
    if not folder.is_dir():
        raise CheckpointError(os.fspath(path), ["is not a folder (a checkpoint is a folder)"])
    if (folder / checkpoint.METADATA_FILE).exists():
        return checkpoint.restore(folder, dtype=dtype)
    if (folder / "config.json").exists() and ((folder / SINGLE_FILE).exists() or (folder / INDEX_FILE).exists()):
        return load_hf_checkpoint(folder, dtype=dtype or "float32")
    raise CheckpointError(os.fspath(path), [
        f"is neither a converted checkpoint ({checkpoint.METADATA_FILE}, see `python -m convert import`) nor a "
        f"Hugging Face folder (config.json with {SINGLE_FILE} or {INDEX_FILE})"])


def load_model_and_tokenizer(path: str | os.PathLike[str],
                             dtype: Any = None) -> tuple[HuginnConfig, Params, Tokenizer]:
    """`load_model` plus the folder's tokenizer, checked against the model's vocabulary."""
    config, params = load_model(path, dtype)
    tokenizer = load_tokenizer(path)
    check_vocab(tokenizer, config)
    return config, params, tokenizer
