"""Huginn's training recipe as pure functions: randomized unrolling with truncated backprop.

Per step the recurrence count is drawn like the reference's "poisson-lognormal-filling" scheme: a
rate from a log-normal around `mean_recurrence` (sigma 0.5), a Poisson draw plus one, of which the
last `mean_backprop_depth` steps carry gradients and the rest run without (truncated backprop; the
embeddings still get gradients through the injection at every step with gradient). The draw is a
traced value, so every depth runs the same compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from huginn_jax.config import HuginnConfig
from huginn_jax.model import embed_inputs, initial_state, iterate, lm_head, predict_from_latents
from huginn_jax.recurrence import FixedDepth

Array = jax.Array
Params = dict[str, Any]

LOGNORMAL_SIGMA = 0.5


def sample_recurrence(rng: np.random.Generator, mean_recurrence: int, mean_backprop_depth: int) -> tuple[int, int]:
    """(steps without gradient, steps with gradient) of one training step; the reference's
    `randomized_iteration_sampler` in training mode."""
    mu = math.log(max(mean_recurrence, 1)) - LOGNORMAL_SIGMA ** 2 / 2
    total = int(rng.poisson(rng.lognormal(mu, LOGNORMAL_SIGMA))) + 1
    return max(total - mean_backprop_depth, 0), min(mean_backprop_depth, total)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay to `final_lr_fraction`, after global-norm clipping."""

    learning_rate: float = 1e-3
    warmup_steps: int = 200
    total_steps: int = 4000
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, max(self.warmup_steps, 1), max(self.total_steps, self.warmup_steps + 1),
            self.learning_rate * self.final_lr_fraction)

    def build(self) -> optax.GradientTransformation:
        """Norms and biases get no weight decay, as usual for sandwich-norm transformers."""
        decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
        return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                           optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, weight_decay=self.weight_decay,
                                       mask=decay_mask))


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer updates done
    params: Params  # float32 master weights
    opt_state: Any


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def unrolled_logits(params: Params, config: HuginnConfig, tokens: Array, no_grad_steps: Array,
                    grad_steps: Array, key: Array, remat: bool = True) -> Array:
    """Logits [B, T, V] after `no_grad_steps` recurrences without gradient from the random state,
    then `grad_steps` (<= config.mean_backprop_depth) with gradient; `remat` recomputes each step's
    activations in the backward pass instead of storing them (activation checkpointing per step)."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    block, _ = embed_inputs(params, config, tokens, positions)
    state = initial_state(config, key, block.embeds.shape, 1.0, block.embeds.dtype)
    frozen = jax.lax.stop_gradient(params)
    recurred, _ = iterate(frozen, config, jax.lax.stop_gradient(block), state, FixedDepth(no_grad_steps))
    state = jax.lax.stop_gradient(recurred.state)
    recurred, _ = iterate(params, config, block, state, FixedDepth(grad_steps),
                          unroll=max(config.mean_backprop_depth, 1), remat=remat)
    hidden, _ = predict_from_latents(params, config, recurred.state, block.where)
    return lm_head(params, config, hidden)


def masked_loss(logits: Array, tokens: Array, mask: Array) -> tuple[Array, dict[str, Array]]:
    """Mean next-token cross-entropy over positions where `mask` [B, T] is 1 (mask[t] scores the
    prediction of tokens[t + 1]), and the accuracy of those predictions."""
    targets = jnp.roll(tokens, -1, axis=1)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (losses * mask).sum() / count, {"token_accuracy": (correct * mask).sum() / count}


@functools.partial(jax.jit, static_argnames=("config", "optimizer", "compute_dtype", "remat"), donate_argnums=0)
def train_step(state: TrainState, tokens: Array, mask: Array, no_grad_steps: Array, grad_steps: Array, key: Array,
               *, config: HuginnConfig, optimizer: optax.GradientTransformation, compute_dtype: Any = jnp.float32,
               remat: bool = True) -> tuple[TrainState, dict[str, Array]]:
    """One AdamW update on a batch (tokens, loss mask [B, T]); the forward runs in `compute_dtype`
    (bfloat16 for mixed precision) from the float32 master weights."""

    def loss_fn(params: Params) -> tuple[Array, dict[str, Array]]:
        compute = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        logits = unrolled_logits(compute, config, tokens, no_grad_steps, grad_steps, key, remat)
        return masked_loss(logits, tokens, mask)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
