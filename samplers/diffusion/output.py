"""The host-side output record of a diffusion run: generated tokens, per-token recurrence,
statistics and tablets."""

from __future__ import annotations

from typing import Any

import numpy as np

from samplers.common import NO_TOKEN, GenerateOutput
from samplers.diffusion.settings import Plan
from samplers.diffusion.state import Diffusion

STAT_NAMES = ("num_core_forward_passes", "num_tokens_forward", "num_cache_clears", "num_standing_waves",
              "diffusion_steps", "gen_seq_length", "len_prefill")
"""The reference's scalar statistics ([B] each)."""

TABLET_NAMES = ("token_tablet", "frozen_tablet", "counter_tablet", "stability_tablet", "criterion_tablet")


def diffusion_output(state: Diffusion, lengths: np.ndarray, plan: Plan, reference_compatible: bool, num_steps: int,
                     extra_stats: dict[str, Any] | None = None) -> GenerateOutput:
    """The output of a finished run (`state` on the host); `extra_stats` join the statistics."""
    wave, stats = state.wave, state.stats
    batch = lengths.shape[0]
    n_frozen = np.asarray(wave.n_frozen)
    generated = n_frozen - lengths
    if not reference_compatible:
        generated = np.minimum(generated, plan.max_new_tokens)
    width = max(int(generated.max()), 1)
    tokens = np.full((batch, width), NO_TOKEN, np.int32)
    steps = np.zeros((batch, width), np.int32)
    for b in range(batch):
        n = int(generated[b])
        tokens[b, :n] = wave.seq[b, lengths[b]: lengths[b] + n]
        steps[b, :n] = stats.counter[b, lengths[b]: lengths[b] + n]
    core_passes, tokens_forward = np.asarray(stats.core_passes), np.asarray(stats.tokens_forward)
    prefilled = int(plan.full_prefill)
    out_stats = {
        "num_core_forward_passes": core_passes, "num_tokens_forward": tokens_forward,
        "num_cache_clears": np.asarray(stats.cache_clears), "num_standing_waves": np.asarray(stats.standing_waves),
        "diffusion_steps": np.asarray(state.step), "gen_seq_length": np.asarray(wave.n_cur),
        "len_prefill": np.asarray(lengths),
        # the prefill (num_steps on every prompt position), then inner_recurrence steps per sampler step
        "sequential_core_steps": num_steps * prefilled + core_passes - prefilled,
        "core_position_steps": (num_steps * np.asarray(lengths) + tokens_forward - np.asarray(lengths)
                                if prefilled else tokens_forward),
        "recurrence_per_position": [stats.counter[b, : n_frozen[b]].tolist() for b in range(batch)],
        "token_stable_per_position": [stats.stable[b, : n_frozen[b]].tolist() for b in range(batch)],
        **(extra_stats or {}),
    }
    tablets = None
    if state.tablets is not None:
        t = state.tablets
        tablets = dict(zip(TABLET_NAMES, (np.asarray(a) for a in (t.token, t.frozen, t.counter, t.stability,
                                                                   t.criterion))))
    return GenerateOutput(tokens=tokens, lengths=generated.astype(np.int64), recurrence_steps=steps, stats=out_stats,
                          tablets=tablets)
