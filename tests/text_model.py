"""A small random Huginn model with the real Huginn-0125 tokenizer, in Hugging Face layout.

`write_text_model(folder)` writes what a user downloads from the Hub, in miniature: `config.json`,
`model.safetensors` (official key names, float32) and the tokenizer files of Huginn-0125
(tokenizer.json, tokenizer_config.json with its chat template, special_tokens_map.json,
generation_config.json). Width 64, 4 heads, 1/2/1 layers, 65536 ids, context 512: text goes in and
comes out through every sampler in well under a second per call on a CPU.

Its random weights give a nearly flat next-token distribution (tests/test_tokenizer.py measures it:
entropy above 0.95 * ln 65536, no token above 1% probability), so a test that samples from it sees
a different token whenever its key, temperature or filtering differs, and an argmax never wins
by accident.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from huginn_jax.config import HuginnConfig
from huginn_jax.hf_layout import params_to_hf
from huginn_jax.params import init_params

HUGINN_TOKENIZER = Path(__file__).parent / "fixtures" / "huginn-0125-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

TEXT_MODEL_CONFIG = HuginnConfig(
    n_embd=64, n_heads=4, num_key_value_heads=4, intermediate_size=128, vocab_size=65536,
    n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1, block_size=512,
    mean_recurrence=4, mean_backprop_depth=2,
)
"""Width 64, 4 heads, 1/2/1 layers, intermediate 128, the real 65536-id vocabulary, context 512."""


def write_text_model(folder: str | Path, seed: int = 0, config: HuginnConfig = TEXT_MODEL_CONFIG) -> Path:
    """Writes the random model (parameters from `seed`) with the Huginn-0125 tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(init_params(config, jax.random.key(seed)))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in params_to_hf(params, config).items()},
              str(folder / "model.safetensors"))
    with open(HUGINN_TOKENIZER / "config.json", encoding="utf-8") as f:
        special_ids = {k: v for k, v in json.load(f).items() if k.endswith("_token_id")}
    (folder / "config.json").write_text(json.dumps({**config.to_hf_dict(), **special_ids}, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copyfile(HUGINN_TOKENIZER / name, folder / name)
    return folder
