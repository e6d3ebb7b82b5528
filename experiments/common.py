"""Small helpers shared by the experiment scripts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huginn_jax import checkpoint as converted
from huginn_jax.config import HuginnConfig
from huginn_jax.loading import load_hf_checkpoint
from huginn_jax.tasks.arithmetic import TaskTokenizer

# The tiny reference model that ships with the repository: golden outputs of the official code.
DEFAULT_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "huginn-reference-tiny"


def load_checkpoint(path: str | os.PathLike[str], dtype: Any) -> tuple[HuginnConfig, dict]:
    """(config, params) of a Hugging Face layout folder or a converted (`python -m convert`) one."""
    if converted.is_checkpoint(path):
        return converted.restore(path, dtype=dtype)
    return load_hf_checkpoint(path, dtype=dtype)


def load_task_model(path: str | os.PathLike[str], dtype: Any = "float32") -> tuple[HuginnConfig, dict, TaskTokenizer]:
    """(config, params, tokenizer) of an arithmetic-task model: a checkpoint folder (converted or
    Hugging Face layout) that holds its `tokenizer.json`."""
    tokenizer_path = Path(path) / "tokenizer.json"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{tokenizer_path} is missing: an arithmetic model ships its tokenizer "
                                "(python -m experiments.train writes it next to the model)")
    config, params = load_checkpoint(path, dtype)
    return config, params, TaskTokenizer.from_file(tokenizer_path)


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend; ImportError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install -e '.[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quiet_jax_logs() -> None:
    """absl shows INFO logs; JAX's backend probing (no TPU, no GPU) and Orbax's per-save steps are
    noise at that level."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(_drop_orbax_info)


def _drop_orbax_info(record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or "orbax" not in record.pathname
