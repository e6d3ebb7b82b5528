"""The reference (Hugging Face) tensor layout: official key names, shapes, and the exact mapping
between each official tensor and our parameter arrays, in both directions.

The official layout fuses q/k/v into `attn.Wqkv.weight`, gate/up into `mlp.fc.weight`, stores the
q and k biases together in `attn.qk_bias`, and keeps torch's [out, in] weight orientation. Every
mapping below is a pure reshape/transpose/split, so a round trip is bit-exact. The `freqs_cis`
buffer is recomputed, never a parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from huginn_jax.config import HuginnConfig
from huginn_jax.params import BLOCK_GROUPS

HF_GROUP_PREFIX = {"prelude": "transformer.prelude", "core": "transformer.core_block", "coda": "transformer.coda"}
LM_HEAD = "lm_head.weight"
ROPE_BUFFER = "freqs_cis"
NON_PARAMETER_KEYS = frozenset({ROPE_BUFFER})

LayerArrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class BlockTensor:
    """One official tensor of a sandwich block and how it maps onto our per-layer arrays."""

    suffix: str
    shape: Callable[[HuginnConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, HuginnConfig], LayerArrays]
    to_hf: Callable[[LayerArrays, HuginnConfig], np.ndarray]
    needs_qk_bias: bool = False
    ours: tuple[str, ...] = ()  # the per-layer arrays `to_ours` returns (and `to_hf` reads)


def _split_qkv(w: np.ndarray, c: HuginnConfig) -> LayerArrays:
    """The reference's Wqkv [(H + 2K) D, E] (all q rows, then k, then v) -> wqkv [E, K, G + 2, D]."""
    e, h, k, d = c.n_embd, c.n_heads, c.num_key_value_heads, c.head_dim
    q, kk, v = np.split(w.T, [h * d, (h + k) * d], axis=1)
    return {"wqkv": np.concatenate([q.reshape(e, k, h // k, d), kk.reshape(e, k, 1, d), v.reshape(e, k, 1, d)],
                                   axis=2)}


def _fuse_qkv(p: LayerArrays, c: HuginnConfig) -> np.ndarray:
    e, group = c.n_embd, c.n_heads // c.num_key_value_heads
    w = p["wqkv"]
    return np.concatenate([w[:, :, :group].reshape(e, -1), w[:, :, group].reshape(e, -1),
                           w[:, :, group + 1].reshape(e, -1)], axis=1).T


def _split_fc(w: np.ndarray, c: HuginnConfig) -> LayerArrays:
    """The reference's fc [2M, E] (gate rows, then up rows) -> w_gate_up [E, 2, M]."""
    return {"w_gate_up": w.T.reshape(c.n_embd, 2, c.intermediate_size)}


def _norm_tensor(index: int) -> BlockTensor:
    name = f"norm_{index}"
    return BlockTensor(f"{name}.weight", lambda c: (c.n_embd,), lambda w, c: {name: w}, lambda p, c: p[name],
                       ours=(name,))


BLOCK_TENSORS: tuple[BlockTensor, ...] = (
    BlockTensor("attn.Wqkv.weight",
                lambda c: ((c.n_heads + 2 * c.num_key_value_heads) * c.head_dim, c.n_embd),
                _split_qkv, _fuse_qkv, ours=("wqkv",)),
    BlockTensor("attn.qk_bias",
                lambda c: (2, 1, c.n_heads, c.head_dim),
                lambda b, c: {"q_bias": b[0, 0], "k_bias": b[1, 0]},
                lambda p, c: np.stack([p["q_bias"], p["k_bias"]])[:, None],
                needs_qk_bias=True, ours=("q_bias", "k_bias")),
    BlockTensor("attn.proj.weight",
                lambda c: (c.n_embd, c.n_heads * c.head_dim),
                lambda w, c: {"wo": w.T.reshape(c.n_heads, c.head_dim, c.n_embd)},
                lambda p, c: p["wo"].reshape(-1, c.n_embd).T, ours=("wo",)),
    BlockTensor("mlp.fc.weight",
                lambda c: (2 * c.intermediate_size, c.n_embd),
                _split_fc,
                lambda p, c: p["w_gate_up"].reshape(c.n_embd, -1).T, ours=("w_gate_up",)),
    BlockTensor("mlp.proj.weight",
                lambda c: (c.n_embd, c.intermediate_size),
                lambda w, c: {"w_down": w.T},
                lambda p, c: p["w_down"].T, ours=("w_down",)),
    *(_norm_tensor(i) for i in range(1, 5)),
)


TOP_LEVEL_TENSORS: dict[str, tuple[str, bool]] = {
    "wte": ("transformer.wte.weight", False),
    "adapter": ("transformer.adapter.weight", True),
    "ln_f": ("transformer.ln_f.weight", False),
    "lm_head": (LM_HEAD, False),
}
"""Our array outside the blocks -> (official key, whether the official tensor is its transpose)."""


def flip_top_level(name: str, tensor: np.ndarray) -> np.ndarray:
    """Our array `name` (a key of TOP_LEVEL_TENSORS) from its official tensor, or back: the mapping
    is a transpose or nothing, its own inverse."""
    return tensor.T if TOP_LEVEL_TENSORS[name][1] else tensor


def top_level_names(config: HuginnConfig) -> tuple[str, ...]:
    """Our arrays outside the blocks for `config` (the head only when untied)."""
    return tuple(n for n in TOP_LEVEL_TENSORS if n != "lm_head" or not config.tie_embeddings)


def n_layers(config: HuginnConfig, group: str) -> int:
    return {"prelude": config.n_layers_in_prelude, "core": config.n_layers_in_recurrent_block,
            "coda": config.n_layers_in_coda}[group]


def block_tensors(config: HuginnConfig) -> Iterator[tuple[str, int, BlockTensor]]:
    """(group, layer, tensor) for every block tensor the checkpoint of `config` holds."""
    for group in BLOCK_GROUPS:
        for i in range(n_layers(config, group)):
            for tensor in BLOCK_TENSORS:
                if config.qk_bias or not tensor.needs_qk_bias:
                    yield group, i, tensor


def block_key(group: str, layer: int, tensor: BlockTensor) -> str:
    return f"{HF_GROUP_PREFIX[group]}.{layer}.{tensor.suffix}"


def hf_shapes(config: HuginnConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of every parameter tensor. `lm_head.weight` is listed only when the
    head is untied; a tied checkpoint may still store it (as a copy of the embedding)."""
    e = config.n_embd
    shapes = {"transformer.wte.weight": (config.vocab_size, e),
              "transformer.adapter.weight": (e, 2 * e),
              "transformer.ln_f.weight": (e,)}
    if not config.tie_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, e)
    for group, i, tensor in block_tensors(config):
        shapes[block_key(group, i, tensor)] = tensor.shape(config)
    return shapes


def params_from_hf(get: Callable[[str], np.ndarray], config: HuginnConfig) -> dict:
    """Our parameter tree (numpy, in the checkpoint's dtype) from a getter of official tensors.

    Assumes the keys and shapes were validated (see `huginn_jax.loading`).
    """
    params: dict = {name: flip_top_level(name, get(TOP_LEVEL_TENSORS[name][0]))
                    for name in top_level_names(config)}
    for group in BLOCK_GROUPS:
        params[group] = [{} for _ in range(n_layers(config, group))]
    for group, i, tensor in block_tensors(config):
        params[group][i].update(tensor.to_ours(get(block_key(group, i, tensor)), config))
    return params


def params_to_hf(params: dict, config: HuginnConfig, include_tied_head: bool = False) -> dict[str, np.ndarray]:
    """Official key -> tensor (numpy, contiguous) for our parameter tree."""
    out = {TOP_LEVEL_TENSORS[name][0]: flip_top_level(name, np.asarray(params[name]))
           for name in top_level_names(config)}
    if config.tie_embeddings and include_tied_head:
        out[LM_HEAD] = out["transformer.wte.weight"]
    for group in BLOCK_GROUPS:
        for i, block in enumerate(params[group]):
            layer_arrays = {name: np.asarray(arr) for name, arr in block.items()}
            for tensor in BLOCK_TENSORS:
                if config.qk_bias or not tensor.needs_qk_bias:
                    out[block_key(group, i, tensor)] = tensor.to_hf(layer_arrays, config)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
