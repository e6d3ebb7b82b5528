"""The samplers' analytic roofline: bytes read from HBM and FLOPs of each sampler step, and the
tokens/s bound they set on a chip.

Every sampler step is a few *block passes* (`Pass`): a block of T positions per row through the
prelude, `core_steps` recurrences of the core and the coda, the head decoding some of its
positions, attention reading `context` cache positions at every layer application. Static AR is
one pass of 1 position at depth r per token; a self-speculative round is `lookahead` shallow
one-position passes and one deep pass over `lookahead` positions; a diffusion step is one pass of
the wavefront at depth r'. `SamplerStep` lists a step's passes and the tokens it yields per row.

Costs of a pass, for B rows:
- weights: read once per pass whatever B is (every position shares them): the prelude, the
  adapter's embedding half (the injection, once per pass), per core step the core and the
  adapter's state half, the coda, and the head (the tied embedding, [V, E]) when anything is
  decoded;
- cache: every layer application reads `context` positions of keys and values of each row:
  (P + r C + K) x 2 x kv_heads x head_dim x context x itemsize x B (P, C, K: prelude, core, coda
  layers);
- FLOPs: 2 per weight per position (matrix products), plus attention's 4 x heads x head_dim x
  context per position and layer application, plus the head's 2 x V x E per decoded position.

The bound is the roofline max(bytes / bandwidth, FLOPs / peak): at batch 1 every sampler here is
bandwidth-bound, so tokens/s follows bytes per token; wide wavefronts at large batches turn
compute-bound. It ignores everything but HBM traffic of weights and cache and matrix arithmetic
(activations, launches, the samplers' bookkeeping), so measured or compiled times can only be
slower. `Chip` holds the numbers; `CHIPS` the accelerators the project reports on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from huginn_jax.config import HuginnConfig

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: HBM capacity (bytes), HBM bandwidth (bytes/s), dense bfloat16 peak
    (FLOP/s), and where the numbers come from."""

    name: str
    hbm_bytes: float
    hbm_bandwidth: float
    bf16_flops: float
    source: str


CHIPS: dict[str, Chip] = {
    "A100-40GB": Chip("A100-40GB", 40 * GIB, 1.555e12, 312e12, "NVIDIA A100 datasheet (SXM4 40 GB, dense bf16)"),
    "H100": Chip("H100 SXM", 80 * GIB, 3.35e12, 989e12, "NVIDIA H100 datasheet (SXM5 80 GB, dense bf16)"),
    "H200": Chip("H200", 141e9, 4.8e12, 989e12, "NVIDIA H200 datasheet (SXM 141 GB, dense bf16)"),
    "v4": Chip("TPU v4", 32 * GIB, 1.2e12, 275e12, "Cloud TPU docs: v4 (32 GiB, 1200 GBps, 275 TFLOPs)"),
    "v5e": Chip("TPU v5e", 16 * GIB, 819e9, 197e12, "Cloud TPU docs: v5e (16 GiB, 819 GBps, 197 TFLOPs)"),
    "v5p": Chip("TPU v5p", 95 * GIB, 2.765e12, 459e12, "Cloud TPU docs: v5p (95 GiB, 2765 GBps, 459 TFLOPs)"),
    "v6e": Chip("TPU v6e", 32 * GIB, 1.64e12, 918e12, "Cloud TPU docs: v6e (32 GiB, 1640 GBps, 918 TFLOPs)"),
}

# jax's `device_kind` of each chip (TPU slices count megacore chips as one device).
_DEVICE_KINDS = (("TPU v5 lite", "v5e"), ("TPU v6 lite", "v6e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"),
                 ("TPU v4", "v4"), ("H200", "H200"), ("H100", "H100"), ("A100-SXM4-40GB", "A100-40GB"),
                 ("A100-PCIE-40GB", "A100-40GB"))


def chip_for(device_kind: str) -> Chip | None:
    """The `CHIPS` entry of a jax device kind ('TPU v5 lite', 'NVIDIA H200', ...); None if unknown."""
    for prefix, name in _DEVICE_KINDS:
        if prefix in device_kind:
            return CHIPS[name]
    return None


@dataclasses.dataclass(frozen=True)
class Pass:
    """`count` block passes of `positions` positions per row at `core_steps` recurrences, the head
    decoding `decoded` of them, attention reading `context` cache positions."""

    positions: float
    core_steps: float
    decoded: float
    context: float
    count: float = 1


@dataclasses.dataclass(frozen=True)
class SamplerStep:
    """One step of a sampler: its block passes and the tokens it yields per row (for static AR a
    token; for self-speculative decoding a round; for the diffusion sampler a sampler step)."""

    name: str
    passes: tuple[Pass, ...]
    tokens_per_row: float


@dataclasses.dataclass(frozen=True)
class Cost:
    """HBM bytes and FLOPs of some work for a whole batch, and the tokens it yields (all rows)."""

    weight_bytes: float
    cache_bytes: float
    flops: float
    tokens: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def scaled(self, factor: float) -> "Cost":
        return Cost(*(a * factor for a in dataclasses.astuple(self)))

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes

    def memory_seconds(self, chip: Chip, chips: int = 1) -> float:
        return self.bytes / (chip.hbm_bandwidth * chips)

    def compute_seconds(self, chip: Chip, chips: int = 1) -> float:
        return self.flops / (chip.bf16_flops * chips)

    def seconds(self, chip: Chip, chips: int = 1) -> float:
        """The roofline time on `chips` chips that split the work perfectly."""
        return max(self.memory_seconds(chip, chips), self.compute_seconds(chip, chips))

    def tokens_per_second(self, chip: Chip, chips: int = 1) -> float:
        """The bound on tokens/s (all rows)."""
        return self.tokens / self.seconds(chip, chips)


def _block_weights(config: HuginnConfig) -> int:
    """Weights of one sandwich block (elements)."""
    e, h, kv, d, m = (config.n_embd, config.n_heads, config.num_key_value_heads, config.head_dim,
                      config.intermediate_size)
    qkv = e * kv * (h // kv + 2) * d
    biases = (h + kv) * d if config.qk_bias else 0
    return qkv + h * d * e + 2 * e * m + m * e + 4 * e + biases


def pass_cost(config: HuginnConfig, itemsize: int, batch: int, p: Pass) -> Cost:
    """The `Cost` of `p.count` block passes for `batch` rows (tokens left at 0)."""
    e, v = config.n_embd, config.vocab_size
    block = _block_weights(config)
    prelude, core, coda = (config.n_layers_in_prelude * block, config.n_layers_in_recurrent_block * block,
                           config.n_layers_in_coda * block)
    adapter_half = e * e
    head = v * e if p.decoded else 0
    weights = prelude + adapter_half + p.core_steps * (core + adapter_half) + coda + e + head  # e: ln_f
    applications = config.n_layers_in_prelude + p.core_steps * config.n_layers_in_recurrent_block \
        + config.n_layers_in_coda
    kv_elements = 2 * config.num_key_value_heads * config.head_dim * p.context
    cache = applications * kv_elements * batch
    attention = 4 * config.n_heads * config.head_dim * p.context * applications
    flops = batch * (2 * p.positions * (weights - head) + p.positions * attention + 2 * p.decoded * v * e)
    return Cost(weight_bytes=weights * itemsize * p.count, cache_bytes=cache * itemsize * p.count,
                flops=flops * p.count, tokens=0.0)


def step_cost(config: HuginnConfig, dtype: Any, batch: int, step: SamplerStep) -> Cost:
    """The `Cost` of one sampler step for `batch` rows, with the tokens it yields."""
    itemsize = np.dtype(dtype).itemsize
    total = Cost(0.0, 0.0, 0.0, step.tokens_per_row * batch)
    for p in step.passes:
        total = total + pass_cost(config, itemsize, batch, p)
    return total


# ---------------------------------------------------------------- the samplers' steps

def static_ar_token(r: int, context: float) -> SamplerStep:
    """A static-depth AR token: one position at depth r, decoded."""
    return SamplerStep(f"static AR r={r}", (Pass(1, r, 1, context),), 1.0)


def adaptive_token(mean_steps: float, context: float) -> SamplerStep:
    """An adaptive-depth AR token at a mean depth (latent-diff: its exit test reads no logits)."""
    return SamplerStep(f"adaptive AR ({mean_steps:.1f} steps/token)", (Pass(1, mean_steps, 1, context),), 1.0)


def speculative_round(r: int, draft_steps: int, lookahead: int, tokens_per_round: float,
                      context: float) -> SamplerStep:
    """A self-speculative round: `lookahead` one-position drafts at depth `draft_steps`, then one
    pass over `lookahead` positions at depth r, all decoded."""
    return SamplerStep(f"self-speculative {lookahead}x{draft_steps} (r={r})",
                       (Pass(1, draft_steps, 1, context, count=lookahead), Pass(lookahead, r, lookahead, context)),
                       tokens_per_round)


def diffusion_step(inner_recurrence: int, wavefront: float, tokens_per_step: float, context: float,
                   label: str = "diffusion") -> SamplerStep:
    """A diffusion sampler step: the wavefront at depth r', every position decoded."""
    return SamplerStep(f"{label} (r'={inner_recurrence}, wavefront {wavefront:g})",
                       (Pass(wavefront, inner_recurrence, wavefront, context),), tokens_per_step)


def prefill(r: int, prompt_tokens: int) -> SamplerStep:
    """The prompt at depth r, its last position decoded; it counts the prompt's tokens (a
    prefill's tokens/s are prompt tokens per second)."""
    return SamplerStep(f"prefill ({prompt_tokens} prompt tokens, r={r})", (Pass(prompt_tokens, r, 1, prompt_tokens),),
                       float(prompt_tokens))


def weight_bytes(config: HuginnConfig, dtype: Any) -> int:
    """Bytes of all parameters (the tied head counted once)."""
    block = _block_weights(config)
    total = config.n_layers * block + 2 * config.n_embd ** 2 + config.n_embd + config.vocab_size * config.n_embd
    if not config.tie_embeddings:
        total += config.vocab_size * config.n_embd
    return total * np.dtype(dtype).itemsize


def format_bytes(n: float) -> str:
    """'3.26 GB' (decimal units)."""
    if n <= 0 or not math.isfinite(n):
        return f"{n:g} B"
    units = ("B", "kB", "MB", "GB", "TB")
    power = min(int(math.log10(n) // 3), len(units) - 1)
    return f"{n / 1000 ** power:.3g} {units[power]}"


def bound_table(config: HuginnConfig, dtype: Any, steps: list[SamplerStep], chips: list[str],
                batches: tuple[int, ...] = (1, 32)) -> str:
    """A markdown table: per sampler step its weight and cache bytes (per step, batch 1; the cache
    grows with the batch, the weights do not), tokens per step and row, and the roofline's tokens/s
    bound on one of each of `chips` (names in `CHIPS`) at each of `batches`."""
    head = ["sampler step", "weights / step", "cache / step (per row)", "tokens / step"]
    head += [f"{name} B={b}" for name in chips for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in steps:
        one = step_cost(config, dtype, 1, step)
        cells = [step.name, format_bytes(one.weight_bytes), format_bytes(one.cache_bytes), f"{step.tokens_per_row:.3g}"]
        cells += [f"{step_cost(config, dtype, b, step).tokens_per_second(CHIPS[name]):.4g}"
                  for name in chips for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
