"""Loads the official PyTorch implementation from a local copy, for side-by-side measurements.

The official code is not part of huginn-jax. Point `reference_dir` at the folder holding
`raven_modeling_minimal.py` and `raven_config_minimal.py` (the `recpre/` folder of a checkout of
seal-rg/recurrent-pretraining); it needs torch and transformers, which huginn-jax never needs.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

import numpy as np

from huginn_jax.config import HuginnConfig
from huginn_jax.hf_layout import LM_HEAD, ROPE_BUFFER, params_to_hf

PACKAGE = "huginn_reference_code"


def import_reference(reference_dir: str | os.PathLike[str]) -> types.ModuleType:
    """The reference's `raven_modeling_minimal` module, imported from `reference_dir` alone (the
    package's own __init__ pulls in its training stack, which is not needed here)."""
    reference_dir = os.path.abspath(os.fspath(reference_dir))
    for name in ("raven_modeling_minimal.py", "raven_config_minimal.py"):
        if not os.path.exists(os.path.join(reference_dir, name)):
            raise FileNotFoundError(f"{reference_dir} has no {name}; pass the recpre/ folder of "
                                    "seal-rg/recurrent-pretraining")
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [reference_dir]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.raven_modeling_minimal")


def reference_model(reference_dir: str | os.PathLike[str], config: HuginnConfig, params: dict) -> Any:
    """The official `RavenForCausalLM` for `config`, holding exactly `params` (float32, eval mode)."""
    import torch

    module = import_reference(reference_dir)
    config_module = importlib.import_module(f"{PACKAGE}.raven_config_minimal")
    hf = config.to_hf_dict()
    kwargs = {k: hf[k] for k in ("n_embd", "n_heads", "n_layers", "block_size", "vocab_size", "intermediate_size",
                                 "n_layers_in_recurrent_block", "n_layers_in_prelude", "n_layers_in_coda",
                                 "mean_recurrence", "mean_backprop_depth", "qk_bias", "tie_embeddings",
                                 "rope_base", "norm_eps")}
    model = module.RavenForCausalLM(config_module.RavenConfig(**kwargs)).eval()
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in params_to_hf(params, config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {ROPE_BUFFER, LM_HEAD}:
        raise RuntimeError(f"reference model does not take our tensors: missing {missing}, unexpected {unexpected}")
    return model
