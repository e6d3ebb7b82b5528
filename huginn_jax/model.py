"""The Huginn forward pass as one step API: embed a block of tokens, recur, decode latents.

The split mirrors the reference's `embed_inputs`, `iterate_one_step` / `iterate_forward` and
`predict_from_latents`, each with an optional KV cache:

- `embed_inputs`: embedding and prelude over a block of tokens -> `Embedded` (the embeddings e
  injected at every core step, the block's positions and which rows and tokens write the cache);
- `iterate`: THE loop over the recurrent core, from a state, under a recurrence controller
  (`huginn_jax.recurrence`: fixed depth, adaptive exit, trajectory recording); `core_step` is one
  step of it;
- `predict_from_latents`: ln_f, the coda, ln_f again; `lm_head` turns its output into logits.

`run_block` chains the three (the cached forward every sampler uses) and `forward` is the uncached
forward pass of the reference's `model(input_ids, num_steps=...)`. Every function is pure:
parameters, inputs and the optional cache go in, results and the updated cache come out. The
depth is a traced value, so changing it never recompiles. Every stage runs under a
`jax.named_scope` (prelude, core_step, coda, head; attention and mlp inside blocks) so that
profiles read. On a device mesh (`huginn_jax.sharding`) the embeddings and the state at every
step are pinned to rows over the data axis; without a mesh nothing changes.

Shapes: B batch, T tokens in this call, E width, V vocabulary, S recurrence steps.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from huginn_jax import validation
from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import KVCache, LayerRef
from huginn_jax.layers import TokenPositions, rms_norm, sandwich_block
from huginn_jax.params import check_params
from huginn_jax.recurrence import FixedDepth, Recurrence, Trajectory
from huginn_jax import sharding
from huginn_jax.sharding import constrain

Array = jax.Array
Params = dict[str, Any]


@flax.struct.dataclass
class ForwardOutput:
    logits: Array  # [B, T, V] float32
    latents: Array  # [B, T, E] state after the last recurrence step, after ln_f ("latent_states")
    # [steps, B, T, E] raw state after every recurrence step, with `return_trajectory` (else None):
    # trajectory[-1] is the final state, `latents` its ln_f; `logit_lens` decodes any entry.
    trajectory: Array | None = None


@flax.struct.dataclass
class Embedded:
    """A block of tokens after the prelude: what every core step of the block reads."""

    embeds: Array  # [B, T, E] prelude output e (the reference's input_embeds), injected at every step
    where: TokenPositions  # positions, rotary angles, which tokens write the cache
    lengths: Array  # [B] real tokens of each row (the rest of the block is padding)
    active: Array  # [B] rows that run at all; an inactive row keeps its state and writes nothing

    @property
    def real(self) -> Array:
        """[B, T] bool: the real tokens."""
        return jnp.arange(self.embeds.shape[1])[None, :] < self.lengths[:, None]

    def last(self, values: Array) -> Array:
        """values [B, T, ...] at each row's last real token."""
        return values[jnp.arange(values.shape[0]), self.lengths - 1]


@flax.struct.dataclass
class Recurred:
    """What `iterate` gives: the final state, the steps each row ran, the controller's memory."""

    state: Array  # [B, T, E] raw state after the last step each row ran
    steps: Array  # [B] int32 core steps each row ran
    memory: Any  # the controller's memory after the loop (a trajectory, exit values, ...)


@flax.struct.dataclass
class BlockOutput:
    """`run_block`'s results for a block of tokens."""

    state: Array  # [B, T, E] raw core output (where continuous compute resumes)
    latents: Array  # [B, T, E] ln_f(state), the reference's latent_states
    hidden: Array  # [B, T, E] coda output, the head's input
    steps: Array  # [B] core steps each row ran
    memory: Any  # the recurrence controller's memory


@flax.struct.dataclass
class _LoopCarry:
    step: Array  # scalar int32: the next step's index
    state: Array  # [B, T, E]
    steps: Array  # [B] steps each row ran so far
    memory: Any
    cache: KVCache | None


def embed(params: Params, config: HuginnConfig, input_ids: Array) -> Array:
    """Token embeddings scaled by sqrt(width): [B, T] -> [B, T, E]. The product is taken in float32
    and rounded once, as torch does for a bfloat16 tensor times a Python float."""
    table = params["wte"]
    embeds = (jnp.take(table, input_ids, axis=0).astype(jnp.float32) * config.embed_scale).astype(table.dtype)
    return constrain(embeds, ("batch", None, None))


def initial_state(config: HuginnConfig, key: Array, shape: tuple[int, ...], init_scale: Array | float,
                  dtype: Any) -> Array:
    """The random latent state: truncated normal (+-3 std) with std init_std * init_scale, times
    sqrt(width); all zeros when init_scale is 0."""
    std = config.init_std * config.embed_scale
    noise = jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
    return (noise * (std * jnp.asarray(init_scale, jnp.float32))).astype(dtype)


def run_blocks(blocks: list[Params], x: Array, where: TokenPositions, config: HuginnConfig,
               cache: KVCache | None, group: str, step: Array | int = 0) -> tuple[Array, KVCache | None]:
    """Applies a group of sandwich blocks in order (the core's at recurrence step `step`)."""
    for i, block in enumerate(blocks):
        x, cache = sandwich_block(block, x, where, config, cache, LayerRef(group, i, step))
    return x, cache


def embed_inputs(params: Params, config: HuginnConfig, tokens: Array, positions: Array,
                 cache: KVCache | None = None, *, lengths: Array | None = None, active: Array | None = None,
                 writes: Array | None = None) -> tuple[Embedded, KVCache | None]:
    """Embeds tokens [B, T] at positions [B, T] and runs the prelude (the reference's `embed_inputs`).

    lengths [B]: real tokens per row (default: all); active [B]: rows that run (default: all);
    writes [B, T]: tokens that may write the cache (default: all); inactive rows write nothing.
    """
    batch, length = tokens.shape
    lengths = jnp.full((batch,), length, jnp.int32) if lengths is None else lengths
    active = jnp.ones((batch,), bool) if active is None else active
    where = TokenPositions.create(positions, config, writes).with_writes(active[:, None])
    with jax.named_scope("prelude"):
        embeds, cache = run_blocks(params["prelude"], embed(params, config, tokens), where, config, cache, "prelude")
    return Embedded(embeds=embeds, where=where, lengths=lengths, active=active), cache


def injection(params: Params, config: HuginnConfig, embeds: Array) -> Array:
    """The embeddings' share of the adapter on concat([state, embeds]): computed once per block,
    added at every step."""
    return jnp.einsum("bte,ef->btf", embeds, params["adapter"][config.n_embd:])


def core_step(params: Params, config: HuginnConfig, state: Array, injected: Array, where: TokenPositions,
              step: Array | int, cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """One recurrence step (the reference's `core_block_forward`): the adapter on
    concat([state, embeds]), then the core blocks, writing the cache slots of step `step`."""
    with jax.named_scope("core_step"):
        x = jnp.einsum("bte,ef->btf", state, params["adapter"][: config.n_embd]) + injected
        return run_blocks(params["core"], x, where, config, cache, "core", step)


def iterate(params: Params, config: HuginnConfig, block: Embedded, state: Array, recurrence: Recurrence,
            cache: KVCache | None = None, *, unroll: int = 0, remat: bool = False) -> tuple[Recurred, KVCache | None]:
    """Iterates the core from `state` [B, T, E] while `recurrence` keeps rows running.

    This is the only loop over the core: forward passes, training, every sampler and the logit
    lens run through it. A row that does not take a step keeps its state and writes nothing.
    With `unroll` = n > 0 it is a `lax.scan` of n steps (differentiable; `remat` recomputes each
    step's activations in the backward pass), the controller masking the steps a row skips;
    otherwise a `lax.while_loop` that stops when no row runs.
    """
    injected = injection(params, config, block.embeds)

    def body(carry: _LoopCarry) -> _LoopCarry:
        ran = recurrence.running(carry.memory, carry.step) & block.active  # [B]
        memory, start = recurrence.before_step(carry.memory, carry.step, constrain(carry.state, ("batch", None, None)))
        where = block.where.with_writes(ran[:, None])
        new, cache = core_step(params, config, start, injected, where, carry.step, carry.cache)
        state = jnp.where(ran[:, None, None], new, carry.state)

        def decode(state: Array, cache: KVCache | None) -> tuple[Array, KVCache | None]:
            hidden, cache = predict_from_latents(params, config, state, where, cache)
            return lm_head(params, config, block.last(hidden)), cache

        memory, cache = recurrence.after_step(memory, carry.step, state, ran, cache, decode)
        return _LoopCarry(carry.step + 1, state, carry.steps + ran.astype(jnp.int32), memory, cache)

    carry = _LoopCarry(jnp.int32(0), state, jnp.zeros(state.shape[:1], jnp.int32),
                       recurrence.init(block, state), cache)
    if unroll:
        scanned = jax.checkpoint(body) if remat else body
        carry, _ = jax.lax.scan(lambda c, _: (scanned(c), None), carry, None, length=unroll)
    else:
        keep_going = lambda c: jnp.any(recurrence.running(c.memory, c.step) & block.active)  # noqa: E731
        carry = jax.lax.while_loop(keep_going, body, carry)
    return Recurred(state=carry.state, steps=carry.steps, memory=carry.memory), carry.cache


def predict_from_latents(params: Params, config: HuginnConfig, state: Array, where: TokenPositions,
                         cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """ln_f, the coda blocks, ln_f again: raw states [B, T, E] -> the head's input [B, T, E] (the
    reference's `predict_from_latents` without the head; `lm_head` finishes it)."""
    with jax.named_scope("coda"):
        x = rms_norm(state, params["ln_f"], config.norm_eps)
        x, cache = run_blocks(params["coda"], x, where, config, cache, "coda")
        return rms_norm(x, params["ln_f"], config.norm_eps), cache


def lm_head(params: Params, config: HuginnConfig, hidden: Array) -> Array:
    """Float32 logits [..., V] from hidden states [..., E]; the head is the embedding when tied."""
    with jax.named_scope("head"):
        head = params["wte"] if config.tie_embeddings else params["lm_head"]
        return jnp.einsum("...e,ve->...v", hidden, head, preferred_element_type=jnp.float32)


def run_block(params: Params, config: HuginnConfig, tokens: Array, positions: Array, state: Array,
              recurrence: Recurrence, cache: KVCache | None = None, *, lengths: Array | None = None,
              active: Array | None = None, writes: Array | None = None) -> tuple[BlockOutput, KVCache | None]:
    """Runs tokens [B, T] at positions [B, T] from initial `state` [B, T, E] through the prelude,
    the core under `recurrence` and the coda, writing every layer's keys and values into the cache
    (if given). Options as in `embed_inputs`."""
    block, cache = embed_inputs(params, config, tokens, positions, cache, lengths=lengths, active=active,
                                writes=writes)
    recurred, cache = iterate(params, config, block, state.astype(block.embeds.dtype), recurrence, cache)
    hidden, cache = predict_from_latents(params, config, recurred.state, block.where, cache)
    return BlockOutput(state=recurred.state, latents=rms_norm(recurred.state, params["ln_f"], config.norm_eps),
                       hidden=hidden, steps=recurred.steps, memory=recurred.memory), cache


@sharding.on_mesh
def forward(params: Params, input_ids: Any, num_steps: Array | int, *, config: HuginnConfig,
            key: Array | None = None, init_scale: float = 1.0, input_states: Array | None = None,
            return_trajectory: bool = False, mesh: jax.sharding.Mesh | None = None) -> ForwardOutput:
    """A full causal forward pass without cache, the reference's `model(input_ids, num_steps=...)`.

    input_ids [B, T] integers; the recurrence starts from `input_states` [B, T, E] if given, else
    from the random state drawn with `key` (zeros when init_scale is 0, where no key is needed).
    Jitted; `num_steps` and `init_scale` are traced, so new values do not recompile, except with
    `return_trajectory`, which also returns the state after every step ([num_steps, B, T, E], so
    one compilation per depth) and changes no result; that form is also differentiable.
    `mesh` (or the mesh set with `jax.set_mesh`): run on a device mesh (`huginn_jax.sharding`; rows
    over its data axis, which must divide the batch; parameters placed, heads padded, as
    `sharding.shard_params` does, which is free for parameters it already placed).
    """
    mesh = sharding.resolve_mesh(mesh)
    if mesh is not None:
        config, params = sharding.shard_params(params, config, mesh)
    check_params(params, config)
    input_ids = check_token_ids(input_ids, config)
    if input_states is not None and tuple(input_states.shape) != (*input_ids.shape, config.n_embd):
        raise ValueError(f"input_states has shape {tuple(input_states.shape)}, expected "
                         f"{(*input_ids.shape, config.n_embd)}")
    num_steps = validation.integer("num_steps", num_steps, minimum=0)
    if return_trajectory and num_steps < 1:
        raise ValueError(f"return_trajectory needs an integer num_steps >= 1, got {num_steps}")
    init_scale = validation.number("init_scale", init_scale, minimum=0.0)
    if input_states is None and key is None:
        if init_scale != 0:
            raise ValueError("init_scale > 0 draws a random initial state: pass a PRNG key")
        key = jax.random.key(0)  # multiplied by init_scale = 0 below
    sharding.check_batch(input_ids.shape[0], mesh, "sequences")
    input_ids, input_states = sharding.put_batch((input_ids, input_states), mesh)
    with sharding.use(mesh):
        return _forward(params, input_ids, jnp.int32(num_steps), config=config, key=key,
                        init_scale=jnp.float32(init_scale), input_states=input_states,
                        trajectory_steps=num_steps if return_trajectory else 0)


@functools.partial(jax.jit, static_argnames=("config", "trajectory_steps"))
def _forward(params: Params, input_ids: Array, num_steps: Array, *, config: HuginnConfig, key: Array | None,
             init_scale: Array, input_states: Array | None, trajectory_steps: int = 0) -> ForwardOutput:
    batch, length = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    block, _ = embed_inputs(params, config, input_ids, positions)
    if input_states is None:
        input_states = initial_state(config, key, block.embeds.shape, init_scale, block.embeds.dtype)
    recurrence = Trajectory(trajectory_steps) if trajectory_steps else FixedDepth(num_steps)
    # a trajectory has a static length: a scan, which is also differentiable
    recurred, _ = iterate(params, config, block, input_states.astype(block.embeds.dtype), recurrence,
                          unroll=trajectory_steps)
    hidden, _ = predict_from_latents(params, config, recurred.state, block.where)
    return ForwardOutput(logits=lm_head(params, config, hidden),
                         latents=rms_norm(recurred.state, params["ln_f"], config.norm_eps),
                         trajectory=recurred.memory if trajectory_steps else None)


def logit_lens(params: Params, states: Array, *, config: HuginnConfig) -> Array:
    """Decodes raw latent states [..., B, T, E] (a `trajectory`, or any state) through ln_f, the
    coda and the head into float32 logits [..., B, T, V], each state at positions 0..T-1."""
    check_params(params, config)
    if states.ndim < 3 or states.shape[-1] != config.n_embd:
        raise ValueError(f"states must have shape [..., batch, length, {config.n_embd}], got {states.shape}")
    return _logit_lens(params, states, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _logit_lens(params: Params, states: Array, *, config: HuginnConfig) -> Array:
    *lead, length, width = states.shape
    flat = states.reshape(-1, length, width)  # every leading index is one more sequence of the batch
    positions = jnp.broadcast_to(jnp.arange(length), flat.shape[:2])
    hidden, _ = predict_from_latents(params, config, flat.astype(params["wte"].dtype),
                                     TokenPositions.create(positions, config))
    return lm_head(params, config, hidden).reshape(*lead, length, -1)


def check_token_ids(input_ids: Any, config: HuginnConfig) -> Array:
    """Token ids as an int32 array [B, T], or a ValueError that says what is wrong with them.

    Values are range-checked for numpy and concrete jax arrays alike (one small device-to-host
    read for a jax array); ids inside a trace cannot be checked (jit your own code around
    `forward` only with ids you know are valid)."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None:
        raise ValueError(f"token ids must be an integer array of shape [batch, length], got {type(input_ids)}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"token ids must have an integer dtype, got {dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"token ids must have shape [batch, length], got rank {input_ids.ndim} "
                         f"(shape {tuple(input_ids.shape)})")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"token ids must not be empty, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.block_size:
        raise ValueError(f"{input_ids.shape[1]} tokens exceed the model's context of {config.block_size}")
    if not isinstance(input_ids, jax.core.Tracer):
        low, high = (int(v) for v in jax.device_get((input_ids.min(), input_ids.max())))
        if low < 0 or high >= config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got values in [{low}, {high}]")
    return jnp.asarray(input_ids, jnp.int32)
