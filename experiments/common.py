"""Small helpers shared by the experiment scripts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huginn_jax import cli, distributed, sharding
from huginn_jax.config import HuginnConfig
from huginn_jax.pretrained import load_model
from huginn_jax.tasks.arithmetic import TaskTokenizer

# The tiny reference model that ships with the repository: golden outputs of the official code.
DEFAULT_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "huginn-reference-tiny"


def load_task_model(path: str | os.PathLike[str], dtype: Any = "float32") -> tuple[HuginnConfig, dict, TaskTokenizer]:
    """(config, params, tokenizer) of an arithmetic-task model: a checkpoint folder (converted or
    Hugging Face layout) that holds its `tokenizer.json`."""
    tokenizer_path = Path(path) / "tokenizer.json"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{tokenizer_path} is missing: an arithmetic model ships its tokenizer "
                                "(python -m experiments.train writes it next to the model)")
    config, params = load_model(path, dtype)
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
    logging.getLogger("jax._src.distributed").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(_drop_orbax_info)


def _drop_orbax_info(record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or "orbax" not in record.pathname


def define_device_flags() -> None:
    """The flags of a script that samples on many devices: --mesh, and --distributed with its coordinator."""
    from absl import flags

    flags.DEFINE_string("mesh", "", "DATA,MODEL: sample on a mesh of this process's devices, rows split over DATA "
                        "groups, heads, MLP and vocabulary over MODEL devices (e.g. 1,8); empty: one device.")
    flags.DEFINE_bool("distributed", False, "One process per host (jax.distributed.initialize): the prompts are split "
                      "across processes, each samples its share on its own devices (--mesh), process 0 prints and "
                      "writes everything.")
    flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0 (not needed where JAX "
                        "finds the cluster itself: Cloud TPU pods, SLURM, Open MPI).")
    flags.DEFINE_integer("num_processes", None, "With --coordinator_address: how many processes take part.")
    flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index, 0 to "
                         "num_processes - 1.")


def start_devices() -> Any:
    """Joins the multi-process run (--distributed) and builds this process's mesh (--mesh, over its
    own devices); returns the mesh, or None for one device. Bad values are usage errors."""
    from absl import flags

    values = flags.FLAGS
    try:
        if values.distributed:
            distributed.native_stdout_to_stderr()
            distributed.initialize(values.coordinator_address, values.num_processes, values.process_id)
        elif values.coordinator_address or values.num_processes is not None or values.process_id is not None:
            raise cli.UsageError("--coordinator_address, --num_processes and --process_id need --distributed")
        shape = sharding.parse_mesh(values.mesh)
        if shape is None:
            return None
        import jax

        return sharding.make_mesh(shape, jax.local_devices())
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
