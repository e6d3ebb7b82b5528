"""Architecture configuration of a Huginn (recurrent-depth) model.

`HuginnConfig` holds every field of the reference `RavenConfig` that changes the computation, under
the reference's names, so that an HF `config.json` maps onto it one to one. It is frozen and
hashable: jitted functions take it as a static argument.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration that huginn-jax cannot run, with every problem listed."""


@dataclasses.dataclass(frozen=True)
class HuginnConfig:
    """Shape of a prelude / recurrent core / coda transformer with a sandwich-norm block."""

    n_embd: int = 5280
    n_heads: int = 55
    num_key_value_heads: int = 55
    intermediate_size: int = 17920
    vocab_size: int = 65536
    n_layers_in_prelude: int = 2
    n_layers_in_recurrent_block: int = 4
    n_layers_in_coda: int = 2
    norm_eps: float = 1e-6
    rope_base: float = 50_000.0
    block_size: int = 4096
    qk_bias: bool = True
    tie_embeddings: bool = True
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    # Zero kv heads (each with its group of zero query heads) stored after the real ones, so that a
    # mesh's model axis divides the heads (`huginn_jax.sharding.pad_heads`): the same function, a
    # different parameter shape. Not part of the Hugging Face config; 0 for every checkpoint.
    kv_head_padding: int = 0

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("invalid HuginnConfig:\n  - " + "\n  - ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        positive = ("n_embd", "n_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
                    "n_layers_in_recurrent_block", "block_size")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        for name in ("n_layers_in_prelude", "n_layers_in_coda", "mean_recurrence", "mean_backprop_depth",
                     "kv_head_padding"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name}={getattr(self, name)} must not be negative")
        if self.n_heads > 0 and self.n_embd % self.n_heads:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_heads={self.n_heads}")
        elif self.n_heads > 0 and (self.n_embd // self.n_heads) % 2:
            problems.append(f"head_dim={self.n_embd // self.n_heads} must be even for rotary embeddings")
        if self.num_key_value_heads > 0 and self.n_heads % self.num_key_value_heads:
            problems.append(
                f"n_heads={self.n_heads} is not divisible by num_key_value_heads={self.num_key_value_heads}")
        if self.qk_bias and self.num_key_value_heads != self.n_heads:
            problems.append("qk_bias stores one bias per query head for both q and k ([2, 1, n_heads, head_dim]), "
                            "so it needs num_key_value_heads == n_heads")
        if not self.norm_eps > 0:
            problems.append(f"norm_eps={self.norm_eps} must be positive")
        if not self.rope_base > 0:
            problems.append(f"rope_base={self.rope_base} must be positive")
        return problems

    # ---- derived quantities (the reference derives the same ones in RavenConfig) ----
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def stored_kv_heads(self) -> int:
        """Key/value heads of the parameters and the cache: the real ones plus `kv_head_padding`."""
        return self.num_key_value_heads + self.kv_head_padding

    @property
    def stored_heads(self) -> int:
        """Query heads of the parameters: each stored kv head with its group of query heads."""
        return self.stored_kv_heads * (self.n_heads // self.num_key_value_heads)

    @property
    def n_layers(self) -> int:
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def effective_expected_depth(self) -> int:
        """Layers unrolled at the mean recurrence; sets the init scale of output projections."""
        return (self.n_layers_in_prelude + self.n_layers_in_coda
                + self.n_layers_in_recurrent_block * self.mean_recurrence)

    @property
    def init_std(self) -> float:
        """The 'takase' std sqrt(2 / (5 width)) of weights, embeddings and the random latent state."""
        return math.sqrt(2.0 / (5.0 * self.n_embd))

    @property
    def out_proj_std(self) -> float:
        return self.init_std / math.sqrt(2.0 * self.effective_expected_depth)

    @property
    def embed_scale(self) -> float:
        """Input embeddings (and the random state) are multiplied by sqrt(width)."""
        return math.sqrt(self.n_embd)

    def replace(self, **changes: Any) -> "HuginnConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "HuginnConfig":
        """Builds a config from the reference's `config.json` contents; rejects what we cannot run."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in hf and field.name not in _NOT_HF_FIELDS:
                values[field.name] = hf[field.name]
        if "n_heads" not in hf and "num_attention_heads" in hf:
            values["n_heads"] = hf["num_attention_heads"]
        if "n_embd" not in hf and "hidden_size" in hf:
            values["n_embd"] = hf["hidden_size"]
        if "num_key_value_heads" not in hf and "n_heads" in values:
            values["num_key_value_heads"] = values["n_heads"]  # the reference derives kv heads = heads

        for name, allowed in _FIXED_ARCHITECTURE_VALUES.items():
            if name in hf and hf[name] not in allowed:
                problems.append(f"{name}={hf[name]!r} is not supported (supported: {', '.join(map(repr, allowed))})")
        if hf.get("test_time_noise", 0) not in (0, 0.0, None):
            problems.append(f"test_time_noise={hf['test_time_noise']!r} changes the forward pass; only 0 is supported")
        padded = hf.get("padded_vocab_size")
        if padded is not None and "vocab_size" in values and padded != values["vocab_size"]:
            problems.append(f"padded_vocab_size={padded} differs from vocab_size={values['vocab_size']}")
        if "tie_word_embeddings" in hf and "tie_embeddings" in values and \
                bool(hf["tie_word_embeddings"]) != bool(values["tie_embeddings"]):
            problems.append("tie_word_embeddings and tie_embeddings disagree")
        unknown = sorted(k for k in hf if k not in _KNOWN_HF_KEYS and not k.startswith("_"))
        if unknown:
            problems.append("unknown fields that may change the architecture: " + ", ".join(unknown))
        if problems:
            raise ConfigError("config.json cannot be used:\n  - " + "\n  - ".join(problems))

        try:
            config = cls(**values)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.json cannot be used: {err}") from err
        consistency = {
            "head_dim": config.head_dim,
            "n_layers": config.n_layers,
            "effective_expected_depth": config.effective_expected_depth,
        }
        for name, derived in consistency.items():
            if name in hf and hf[name] != derived:
                problems.append(f"{name}={hf[name]} contradicts the other fields, which give {derived}")
        init_values = hf.get("init_values") or {}
        for name, derived in (("std", config.init_std), ("embed_scale", config.embed_scale)):
            if name in init_values and not math.isclose(init_values[name], derived, rel_tol=1e-6):
                problems.append(f"init_values.{name}={init_values[name]} differs from the derived {derived}")
        if problems:
            raise ConfigError("config.json is inconsistent:\n  - " + "\n  - ".join(problems))
        return config

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike[str]) -> "HuginnConfig":
        """Reads `config.json` (or the folder holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """The reference's `config.json` contents for this architecture."""
        out: dict[str, Any] = {
            "architectures": ["RavenForCausalLM"],
            "model_type": "huginn_raven",
            "auto_map": {
                "AutoConfig": "raven_config_minimal.RavenConfig",
                "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM",
            },
        }
        out.update({name: values[0] for name, values in _FIXED_ARCHITECTURE_VALUES.items()})
        out.update({k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_HF_FIELDS})
        out.update(
            n_layers=self.n_layers,
            head_dim=self.head_dim,
            padded_vocab_size=self.vocab_size,
            effective_expected_depth=self.effective_expected_depth,
            init_values={
                "std": self.init_std,
                "out_proj": self.out_proj_std,
                "embedding": self.init_std,
                "embed_scale": self.embed_scale,
            },
        )
        return out


# Fields of HuginnConfig that describe how huginn-jax stores the parameters, not the model.
_NOT_HF_FIELDS = frozenset({"kv_head_padding"})

# Fields of the reference config that select an implementation; we implement exactly these values.
_FIXED_ARCHITECTURE_VALUES: dict[str, tuple[Any, ...]] = {
    "architecture_class_name": ("RecurrentGPT",),
    "block_class_name": ("SandwichBlock",),
    "norm_class_name": ("RMSNorm_llama",),
    "mlp_class_name": ("GatedMLP",),
    "nonlin_name": ("SiLU",),
    "injection_type": ("linear",),
    "state_init": ("like-init",),
    "bias": (False,),
    "model_type": ("huginn_raven",),
}

# Fields that are checked elsewhere, describe training or packaging, or are generic HF bookkeeping.
_KNOWN_HF_KEYS = frozenset(
    ({f.name for f in dataclasses.fields(HuginnConfig)} - _NOT_HF_FIELDS)
    | set(_FIXED_ARCHITECTURE_VALUES)
    | {
        "num_attention_heads", "hidden_size", "head_dim", "n_layers", "padded_vocab_size", "padding_multiple",
        "effective_expected_depth", "init_values", "init_strategy", "init_orthogonal", "sampling_scheme",
        "activation_checkpoint_impl", "test_time_noise", "test_time_noise_type", "tie_word_embeddings",
        "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
        "eos_token_id", "pad_token_id", "use_cache", "return_dict", "output_hidden_states",
        "output_attentions", "torchscript", "is_encoder_decoder",
    }
)

HUGINN_0125 = HuginnConfig()
"""The released Huginn-0125 (3.5B): 5280 wide, 55 heads, 2/4/2 layers, 65536 vocab, 4096 context."""

TINY = HuginnConfig(
    n_embd=64, n_heads=4, num_key_value_heads=4, intermediate_size=128, vocab_size=256,
    block_size=256, mean_recurrence=8, mean_backprop_depth=2,
)
"""A tiny model with the reference fixture's shape (width 64, 4 heads, 2/4/2 layers, vocab 256)."""

CPU_BENCHMARK = HuginnConfig(
    n_embd=512, n_heads=8, num_key_value_heads=8, intermediate_size=1536, vocab_size=32768,
)
"""The `cpu` benchmark profile: width 512, 8 heads, intermediate 1536, vocab 32768, 2/4/2 layers."""

PRESETS: dict[str, HuginnConfig] = {"huginn-0125": HUGINN_0125, "tiny": TINY, "cpu": CPU_BENCHMARK}


def preset(name: str) -> HuginnConfig:
    """A named configuration: one of `PRESETS`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
