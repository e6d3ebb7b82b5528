"""Per-step exit criteria for adaptive depth, the reference's exit evaluators (`recurrence.AdaptiveExit`).

A criterion is a pair of pure functions over an explicit state: `init` builds the state from the
initial latents, `update` takes the latents after a recurrence step (and the logits of each
sequence's last token, for criteria that need them) and returns the new state with one value per
sequence. A sequence exits when `exits(value, threshold)`. Pass an `ExitCriterion` of your own as
`criterion=` to plug in a new rule.

Latent-based criteria average over a sequence's real tokens (the whole prompt in prefill); the
logit-based ones look at its last token, like the reference with `reduce=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
State = Any


@dataclasses.dataclass(frozen=True)
class ExitCriterion:
    """An exit rule: see the module docstring. `needs_logits` makes the sampler run the coda
    before every check."""

    name: str
    default_threshold: float
    needs_logits: bool
    init: Callable[[Array, Array, int], State]  # (latents [B, T, E], real [B, T], vocab size) -> state
    update: Callable[[State, Array, Array, Array | None], tuple[State, Array]]  # (state, latents, real, logits)
    exits: Callable[[Array, Array], Array] = lambda value, threshold: value < threshold

    def threshold(self, exit_threshold: float | str) -> float:
        """The threshold to use: the criterion's own for "auto"."""
        return self.default_threshold if exit_threshold == "auto" else float(exit_threshold)


def _mean_over_real(values: Array, real: Array) -> Array:
    """Mean of values [B, T] over each row's real tokens."""
    real = real.astype(values.dtype)
    return (values * real).sum(-1) / real.sum(-1)


def _norm(x: Array) -> Array:
    return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


def _latent_diff(prev: Array, latents: Array, real: Array, logits: Array | None) -> tuple[Array, Array]:
    """||z - z_prev|| / ||z|| per token, averaged over the sequence."""
    change = _norm(latents - prev) / _norm(latents)
    return latents, _mean_over_real(change, real)


def _cosine(prev: Array, latents: Array, real: Array, logits: Array | None) -> tuple[Array, Array]:
    """1 - cos(z, z_prev), with the cosine averaged over the sequence."""
    cos = (latents.astype(jnp.float32) * prev.astype(jnp.float32)).sum(-1) / _norm(latents) / _norm(prev)
    return latents, 1.0 - _mean_over_real(cos, real)


def _entropy_diff(prev: Array, latents: Array, real: Array, logits: Array) -> tuple[Array, Array]:
    """|H(p) - H(p_prev)| of the last token's distribution."""
    probs = jax.nn.softmax(logits, axis=-1)
    entropy = -jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    return entropy, jnp.abs(entropy - prev)


def _kl_from_previous(prev_log_probs: Array, log_probs: Array) -> Array:
    """KL(p_prev || p) summed over the vocabulary (torch's kl_div(log p, log p_prev, log_target=True))."""
    return jnp.sum(jnp.exp(prev_log_probs) * (prev_log_probs - log_probs), axis=-1)


def _kl(prev: Array, latents: Array, real: Array, logits: Array) -> tuple[Array, Array]:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return log_probs, _kl_from_previous(prev, log_probs)


def _minp_log_probs(logits: Array) -> Array:
    """Log of the distribution with every probability below 0.1 x the largest raised to 1/V."""
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(probs < 0.1 * probs.max(axis=-1, keepdims=True), 1.0 / logits.shape[-1], probs)
    return jnp.log(probs / probs.sum(axis=-1, keepdims=True))


def _minp_kl(prev: Array, latents: Array, real: Array, logits: Array) -> tuple[Array, Array]:
    log_probs = _minp_log_probs(logits)
    return log_probs, _kl_from_previous(prev, log_probs)


def _argmax_stability(prev: tuple[Array, Array], latents: Array, real: Array,
                      logits: Array) -> tuple[tuple[Array, Array], Array]:
    """Consecutive checks on which the last token's argmax did not change."""
    prev_argmax, stable = prev
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    stable = jnp.where(argmax == prev_argmax, stable + 1, 0)
    return (argmax, stable), stable


def _uniform_log_probs(latents: Array, real: Array, vocab: int) -> Array:
    return jnp.full((latents.shape[0], vocab), jnp.log(1.0 / vocab), jnp.float32)


CRITERIA: dict[str, ExitCriterion] = {
    "latent-diff": ExitCriterion("latent-diff", 0.03, False, lambda z, real, v: z, _latent_diff),
    "cosine": ExitCriterion("cosine", 1e-3, False, lambda z, real, v: z, _cosine),
    "entropy-diff": ExitCriterion("entropy-diff", 1e-3, True,
                                  lambda z, real, v: jnp.full((z.shape[0],), 100.0, jnp.float32), _entropy_diff),
    "kl": ExitCriterion("kl", 1e-3, True, _uniform_log_probs, _kl),
    "minp-kl": ExitCriterion("minp-kl", 1e-5, True, _uniform_log_probs, _minp_kl),
    "argmax-stability": ExitCriterion(
        "argmax-stability", 5, True,
        lambda z, real, v: (jnp.full((z.shape[0],), -1, jnp.int32), jnp.zeros((z.shape[0],), jnp.int32)),
        _argmax_stability, exits=lambda value, threshold: value >= threshold),
    "none": ExitCriterion("none", 0.0, False, lambda z, real, v: (),
                          lambda state, z, real, logits: (state, jnp.zeros((z.shape[0],), jnp.float32)),
                          exits=lambda value, threshold: jnp.zeros(value.shape, bool)),
}


def get_criterion(criterion: str | ExitCriterion) -> ExitCriterion:
    """A built-in criterion by its reference name, or the given one."""
    if isinstance(criterion, ExitCriterion):
        return criterion
    if criterion not in CRITERIA:
        raise ValueError(f"unknown exit criterion {criterion!r}; choose one of {sorted(CRITERIA)} "
                         "or pass an ExitCriterion")
    return CRITERIA[criterion]
