"""The options of a diffusion run: the traced settings (new values never recompile), the static
plan (what shapes the compiled programs), the paper's presets, and the windows the model runs on."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

PRESETS: dict[str, dict[str, Any]] = {
    # Table 1 of the paper, "Diff. sampler r'=4, beta_t=0 (default)": 4.4-4.8x AR r=32 on Huginn-0125.
    "paper-main": dict(inner_recurrence=4, state_noise_mixing=0.0, ema_embeds=0.1, exit_t=0.03,
                       freeze_strategy="latent-diff", headway=1, max_wavefront=128),
    # Table 1, "Diff. sampler r'=2, beta_t=0.5": faster, about one point less accurate.
    "paper-fast": dict(inner_recurrence=2, state_noise_mixing=0.5, ema_embeds=0.1, exit_t=0.03,
                       freeze_strategy="latent-diff", headway=1, max_wavefront=128),
}

REFERENCE_FILLER_IDS = 65510  # the reference draws headway filler from [0, 65510)
ORDINARY_IDS = 65504  # Huginn's special tokens start at <|begin_text|> = 65504


@flax.struct.dataclass
class Settings:
    """The traced options of a run (scalars); changing any of them reuses the compiled programs."""

    num_steps: Array  # int32: prefill depth; "fixed" and "token-stability" wait num_steps // inner_recurrence
    inner_recurrence: Array  # int32: core steps per sampler step
    freeze_rule: Array  # int32: index of the freeze rule in FREEZE_STRATEGIES
    exit_t: Array  # float32: threshold of the latent freeze rules
    ema: Array  # float32: momentum on the embeddings of positions already in the wavefront
    ema_keep: Array  # float32: 1 - ema, rounded once on the host (as the reference's 1 - ema_embeds)
    noise: Array  # float32: weight of the fresh state mixed in before each step
    dampened: Array  # bool: divide the noise weight by 1 + the position's recurrence count
    sqrt_mixer: Array  # bool: mix variance-preserving
    continuous: Array  # bool: new positions start from copies of the rightmost states
    compatible: Array  # bool: the reference's stop check and filler ids
    init_scale: Array  # float32: scale of random states
    max_diffusion_steps: Array  # int32: a cap on sampler steps

    @classmethod
    def create(cls, *, num_steps: int, inner_recurrence: int, freeze_rule: int, exit_t: float, ema_embeds: float,
               state_noise_mixing: float, dampened_state_mixer: bool, sqrt_mixer: bool, continuous_compute: bool,
               reference_compatible: bool, init_scale: float, max_diffusion_steps: int) -> "Settings":
        """From validated host values."""
        return cls(num_steps=jnp.int32(num_steps), inner_recurrence=jnp.int32(inner_recurrence),
                   freeze_rule=jnp.int32(freeze_rule), exit_t=jnp.float32(exit_t), ema=jnp.float32(ema_embeds),
                   ema_keep=jnp.float32(1 - ema_embeds), noise=jnp.float32(state_noise_mixing),
                   dampened=jnp.bool_(dampened_state_mixer), sqrt_mixer=jnp.bool_(sqrt_mixer),
                   continuous=jnp.bool_(continuous_compute), compatible=jnp.bool_(reference_compatible),
                   init_scale=jnp.float32(init_scale), max_diffusion_steps=jnp.int32(max_diffusion_steps))

    @property
    def patience(self) -> Array:
        """Sampler steps that "fixed" and "token-stability" wait: num_steps // inner_recurrence."""
        return self.num_steps // self.inner_recurrence


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of a run: what the compiled programs depend on besides the arrays' shapes."""

    headway: int  # new positions per step
    ring: int  # max_wavefront: ring buffer entries and the largest wavefront
    full_prefill: bool
    max_new_tokens: int
    tablet_rows: int  # sampler steps the analysis tablets record (0: none)


WINDOW_WIDTHS = (8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)
"""8, then powers of two and their 1.25x and 1.5x: a window pads a wavefront of more than 8
positions by at most 20 % (a step's cost grows with its positions), and every window a run meets
is one more compiled program, so a wavefront growing from 1 to 10 meets two (8 and 10)."""


def window_for(width: int, ring: int) -> int:
    """The narrowest window that holds a wavefront of `width` positions (at most `ring`)."""
    for window in WINDOW_WIDTHS:
        if window >= width:
            return min(window, ring)
    return min(-(-width // 64) * 64, ring)


def tablet_rows(return_analysis_tablets: bool | int, max_new_tokens: int, headway: int) -> int:
    """Steps the analysis tablets record (0: none)."""
    if return_analysis_tablets is True:
        return (max_new_tokens + headway) * 2
    if return_analysis_tablets is False:
        return 0
    if int(return_analysis_tablets) != return_analysis_tablets or return_analysis_tablets < 1:
        raise ValueError(f"return_analysis_tablets must be a bool or a positive number of steps, "
                         f"got {return_analysis_tablets!r}")
    return int(return_analysis_tablets)
