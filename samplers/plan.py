"""Compile-only plans: the samplers compiled for a TPU slice that is not here, with their memory
per chip, the compiler's time per step, and the tokens/s those times project.

libtpu describes TPU slices without a TPU (`jax.experimental.topologies`): a `Mesh` over its
compile-only devices takes abstract arguments with shardings, and `jax.jit(f).lower(...).compile()`
gives the real TPU executable, whose `memory_analysis()` (argument, output, temporary bytes per
chip) and `cost_analysis()` (FLOPs, bytes, the compiler's `optimal_seconds`) can be read.

Two kinds of programs, both on the mesh under the project's sharding rules (`huginn_jax.sharding`:
rows over `data`; heads, MLP and vocabulary over `model`, heads zero-padded to divide it):

- *step programs*, for time. The cost model counts a loop's body once, so a sampler's loop has no
  meaningful cost; each sampler step is instead composed of straight-line programs built from the
  model's step API (`huginn_jax.roofline` lists the passes each step is made of): a *block*
  (embedding and prelude, one core step, coda and head over T positions per row) and a *core step*
  (one recurrence over T positions), each writing and reading a cache of `context` positions. A
  pass at depth r costs one block and r - 1 core steps. Their cache is read with a masks-only
  lookup, so that the compiler drops the branch that lends missing positions' keys (the cost
  model would charge it, though static-depth steps never take it): the same keys and values are
  read. Static AR at depth r costs block + (r - 1) core steps per token, so its tokens/s is
  B / (r x core + (block - core)): the prelude, coda and head are the `block - core` prefix;
- *sampler programs*, for memory and as a check: the samplers' own compiled loops (the AR
  decoding loop, static and adaptive; the speculative rounds; the diffusion sampler's start and
  one phase of steps) on the arguments the samplers pass. That they compile for the mesh shows no
  sampler mixes shardings; their memory is what a run needs.

The compiler's `optimal_seconds` needs one correction: libtpu's cost model charges -1 s for each
`ConcatBitcast` custom call (which gathers a weight it prefetched in slices, as it does for wo at
one position per row), so a 5 ms step reads -3.995 s. `optimal_seconds` here adds those seconds
back (`Compiled.seconds`), and says when the result is still unusable.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from huginn_jax import roofline, sharding
from huginn_jax.config import HuginnConfig
from huginn_jax.exit_criteria import get_criterion
from huginn_jax.kv_cache import FULL, SHARED, CacheLayout, CacheStrategy, KVCache
from huginn_jax.layers import TokenPositions
from huginn_jax.model import core_step, embed_inputs, injection, lm_head, predict_from_latents
from huginn_jax.params import abstract_params
from huginn_jax.recurrence import AdaptiveExit, FixedDepth
from samplers import autoregressive, speculative
from samplers.common import setup
from samplers.diffusion import loop as diffusion_loop
from samplers.diffusion.freeze import FREEZE_STRATEGIES
from samplers.diffusion.settings import Plan as DiffusionPlan
from samplers.diffusion.settings import Settings as DiffusionSettings
from samplers.diffusion.settings import window_for
from samplers.diffusion.step import Context as DiffusionContext
from samplers.sampling import GREEDY

Array = jax.Array

LIBTPU = "pip install -e '.[tpu]' (jax[tpu]: libtpu, about 700 MB)"
FIT_ADVICE = (f"Use a smaller --batch or --context (the cache holds context x batch positions), a shared cache "
              f"(--cache_lookup_strategy={SHARED}: one slot per core layer), more devices on the model axis (--mesh), "
              "or a larger slice")
UNKNOWN_COST_CALLS = ("ConcatBitcast",)
"""Custom calls that libtpu's cost model charges -1 s each (see the module docstring)."""


class PlanError(ValueError):
    """A plan that cannot be made or does not fit, saying what to change."""


class PlanOptionError(PlanError):
    """A slice name or mesh that cannot be used (a command line's usage error)."""


# ---------------------------------------------------------------- devices and meshes

def tpu_devices(topology: str) -> list[jax.Device]:
    """Compile-only devices of the TPU slice `topology` ("v5e:2x4", "v4:2x2x1", ...: libtpu's
    names). A v4 or v5p chip is one device (megacore), as JAX runs them; a slice smaller than a
    host (v5e:1x1) gets its own host bounds. PlanError without libtpu or for a name it does not know."""
    from jax.experimental import topologies

    if not isinstance(topology, str) or not re.fullmatch(r"[a-z0-9]+:[0-9]+(x[0-9]+)*", topology):
        raise PlanOptionError(f"--topology={topology!r} is not a TPU slice name: write GENERATION:SHAPE, e.g. "
                              "v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4")
    generation, shape = topology.split(":")
    # libtpu looks for the TPU hosts and the accelerator type of the machine it runs on, and complains
    # on stderr when it finds none; the slice's own name quiets it (the compiled programs do not change)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # compiling needs no exclusive use of a TPU: let several processes load libtpu (else the first
    # one to load it, a test run's main process say, locks every other one out)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chips = math.prod(int(n) for n in shape.split("x"))
    accelerator = {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}", "v4": f"v4-{2 * chips}",
                   "v5p": f"v5p-{2 * chips}"}.get(generation)
    if accelerator:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
    options: dict[str, Any] = {"chip_config_name": "megacore"} if generation == "v4" else {}
    try:
        try:
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **options).devices)
        except jax.errors.JaxRuntimeError as err:
            if "chips_per_host_bounds" not in str(err):
                raise
            dims = [int(n) for n in shape.split("x")]  # a slice smaller than a host: it is its own host
            bounds = tuple(dims + [1] * (3 - len(dims)))
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                     chips_per_host_bounds=bounds, **options).devices)
    except RuntimeError as err:
        if "TPU support not installed" in str(err):  # jax without libtpu
            raise PlanError(f"compiling for a TPU needs libtpu, which is not installed: {LIBTPU}") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PlanOptionError(f"libtpu does not know the TPU slice --topology={topology!r} ({reason}); use a name "
                              "such as v5e:1x1, v5e:2x2, v5e:2x4, v4:2x2x1, v5p:2x2x1 or v6e:2x4") from None


def chip_of(devices: Sequence[jax.Device]) -> roofline.Chip:
    """The `roofline.CHIPS` entry of the devices; PlanError for a chip without one."""
    kind = devices[0].device_kind
    chip = roofline.chip_for(kind)
    if chip is None:
        raise PlanError(f"no HBM size or bandwidth is known for {kind!r}; add it to huginn_jax.roofline.CHIPS")
    return chip


def plan_mesh(devices: Sequence[jax.Device], shape: tuple[int, int] | None) -> Mesh:
    """A (data, model) mesh over all `devices`: `shape`, or by default every device on the model
    axis (batch 1 needs the model axis; a data axis must divide every batch)."""
    shape = (1, len(devices)) if shape is None else tuple(shape)
    if math.prod(shape) != len(devices):
        raise PlanOptionError(f"--mesh={shape[0]},{shape[1]} has {math.prod(shape)} devices but the slice has "
                              f"{len(devices)}: choose DATA,MODEL with DATA x MODEL = {len(devices)}")
    return sharding.make_mesh(shape, devices)


# ---------------------------------------------------------------- what is planned

@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """The shapes and options of a plan. Every program's cache holds `context` positions: the
    prompt, the new tokens and what a sampler looks ahead (a speculative round's drafts, the
    diffusion wavefront)."""

    config: HuginnConfig
    dtype: Any = jnp.bfloat16
    prompt_tokens: int = 128
    context: int = 1024
    num_steps: int = 32
    cache_lookup_strategy: str = SHARED
    batches: tuple[int, ...] = (1, 32)
    wavefronts: tuple[int, ...] = (8, 32, 128)
    draft_steps: int = 4
    lookahead: int = 4
    inner_recurrence: int = 4
    max_wavefront: int = 128

    def check(self) -> "PlanSettings":
        if self.prompt_tokens < 1 or self.context > self.config.block_size:
            raise PlanError(f"--context={self.context} must lie within the model's {self.config.block_size} positions "
                            f"and --prompt_tokens={self.prompt_tokens} must be positive")
        room = self.context - self.prompt_tokens - self.max_wavefront - 1
        if room < 1:
            raise PlanError(f"--context={self.context} leaves the diffusion sampler no room for new tokens after a "
                            f"prompt of {self.prompt_tokens} and its wavefront of {self.max_wavefront} + 1: raise "
                            f"--context to at least {self.prompt_tokens + self.max_wavefront + 2}")
        if max(self.wavefronts, default=0) > self.max_wavefront:
            raise PlanError(f"wavefronts {self.wavefronts} exceed max_wavefront={self.max_wavefront}")
        CacheStrategy.parse(self.cache_lookup_strategy, self.config.n_layers_in_recurrent_block)
        return self

    @property
    def new_tokens(self) -> int:
        """New tokens of an AR sampler program (its cache: prompt + new tokens = context)."""
        return self.context - self.prompt_tokens


EMBEDDED_RATES = dict(adaptive_mean_steps=10.6, speculative_tokens_per_round=3.15, diffusion_tokens_per_step=0.77,
                      diffusion_wavefront=15.1)
"""The `Rates` of the embedded arithmetic model (huginn_jax/assets/arithmetic-tiny), measured on
its first 200 held-out problems at batch 1, r=32 (python -m experiments.tpu_plan --measure_rates=200)."""


@dataclasses.dataclass(frozen=True)
class Rates:
    """What a trained model's samplers do per step, which random weights cannot show: the adaptive
    sampler's mean depth per token, tokens per speculative round, tokens per diffusion step and the
    mean wavefront of the paper's setting, and where the numbers come from."""

    adaptive_mean_steps: float
    speculative_tokens_per_round: float
    diffusion_tokens_per_step: float
    diffusion_wavefront: float
    source: str


# ---------------------------------------------------------------- placement and abstract arguments

@dataclasses.dataclass(frozen=True)
class Placement:
    """The config and parameters as the mesh runs them (heads zero-padded so that its model axis
    divides them), and how to place everything else."""

    mesh: Mesh
    config: HuginnConfig  # kv_head_padding set
    params: dict  # ShapeDtypeStructs with their shardings

    @classmethod
    def create(cls, config: HuginnConfig, dtype: Any, mesh: Mesh) -> "Placement":
        padded = config.replace(kv_head_padding=sharding.head_padding(config, mesh))
        shardings = sharding.param_shardings(padded, mesh)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params(padded, dtype), shardings)
        return cls(mesh, padded, params)

    def rows(self, tree: Any) -> Any:
        """Abstract copies of `tree`'s arrays, split by rows (leading axis) over the data axis."""
        return jax.tree.map(lambda a: _abstract(a, sharding.batch_sharding(self.mesh, np.ndim(a))), tree)

    def replicated(self, tree: Any) -> Any:
        return jax.tree.map(lambda a: _abstract(a, sharding.replicated(self.mesh)), tree)

    def cache(self, strategy: str | CacheStrategy, max_steps: int, batch: int, capacity: int, dtype: Any) -> KVCache:
        """An abstract cache in its shardings."""
        shape = jax.eval_shape(lambda: KVCache.create(self.config, strategy, max_steps, batch, capacity, dtype))
        shardings = sharding.cache_shardings(shape, self.mesh)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shape, shardings)


def _abstract(a: Any, where: NamedSharding) -> jax.ShapeDtypeStruct:
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where)
    array = np.asarray(a) if not isinstance(a, jax.Array) else a
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=where)


# ---------------------------------------------------------------- compiling and reading the analyses

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in an optimized HLO module (per device, each
    instruction counted once: a loop body's collectives once per program, not per iteration)."""
    found = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            found[match.group(2)] += sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
                                         for dtype, dims in _SHAPE.findall(match.group(1)))
    return found


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled program: its memory per chip (bytes) and the compiler's cost numbers."""

    name: str
    batch: int
    positions: int  # positions per row (step programs; 0 for sampler programs)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    optimal_seconds: float  # as the compiler reports it
    unknown_cost_calls: int  # custom calls the cost model charged -1 s
    compile_seconds: float
    collective_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # per chip, by kind of collective

    @property
    def per_chip_bytes(self) -> int:
        """HBM a chip holds while the program runs: arguments, outputs not aliased to donated
        arguments, temporaries and the code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def seconds(self) -> float | None:
        """The compiler's time, corrected for the calls it charged -1 s; None where it is unusable."""
        corrected = self.optimal_seconds + self.unknown_cost_calls
        return corrected if corrected > 0 else None


def compile_program(name: str, fn: Callable, args: Sequence[Any], *, batch: int, positions: int = 0,
                    mesh: Mesh, donate: Sequence[int] = (), static: dict[str, Any] | None = None,
                    rules: sharding.ShardingRules | None = None) -> Compiled:
    """Lowers and compiles `fn(*args, **static)` under `mesh` (and `rules`, default the project's)
    and reads its analyses."""
    start = time.perf_counter()
    with sharding.use(mesh, rules):
        # a jitted function keeps its own static and donated arguments
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=tuple(donate))
        try:
            executable = jitted.lower(*args, **(static or {})).compile()
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            reason = str(err).strip().splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")
            raise PlanError(f"the plan does not fit: {name} at batch {batch}: the TPU compiler refuses it ({reason}). "
                            + FIT_ADVICE) from None
    seconds = time.perf_counter() - start
    memory = executable.memory_analysis()
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = executable.as_text()
    unknown = sum(text.count(f'custom_call_target="{target}"') for target in UNKNOWN_COST_CALLS)
    return Compiled(name=name, batch=batch, positions=positions, argument_bytes=memory.argument_size_in_bytes,
                    output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
                    temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
                    flops=float(cost.get("flops", math.nan)),
                    bytes_accessed=float(cost.get("bytes accessed", math.nan)),
                    optimal_seconds=float(cost.get("optimal_seconds", math.nan)), unknown_cost_calls=unknown,
                    compile_seconds=seconds, collective_bytes=collective_bytes(text))


# ---------------------------------------------------------------- step programs

def _timing_strategy(name: str, n_core: int) -> CacheStrategy:
    """The strategy's slots with the masks-only lookup: the same keys read at a static depth,
    without the lending branch (see the module docstring)."""
    strategy = CacheStrategy.parse(name, n_core)
    return dataclasses.replace(strategy, lookup=FULL)


def _cache_of(layout: CacheLayout, strategy: CacheStrategy, k: Array, v: Array, filled: Array) -> KVCache:
    """A cache over the given buffers whose strategy is a constant of the program (`layout` is
    made outside: nothing may run eagerly under a mesh of compile-only devices)."""
    return KVCache(k, v, filled, jnp.asarray(strategy.code), None, layout)


def block_function(config: HuginnConfig, strategy: CacheStrategy, layout: CacheLayout, decode_all: bool) -> Callable:
    """(params, k, v, filled, tokens [B, T], positions [B, T], state [B, T, E]) -> (logits, state,
    k, v, filled): embedding and prelude, one core step, coda and head (every position's logits
    with `decode_all`, else the last position's)."""

    def block(params: dict, k: Array, v: Array, filled: Array, tokens: Array, positions: Array,
              state: Array) -> tuple[Array, ...]:
        cache = _cache_of(layout, strategy, k, v, filled)
        embedded, cache = embed_inputs(params, config, tokens, positions, cache)
        state, cache = core_step(params, config, state, injection(params, config, embedded.embeds), embedded.where, 0,
                                 cache)
        hidden, cache = predict_from_latents(params, config, state, embedded.where, cache)
        logits = lm_head(params, config, hidden if decode_all else hidden[:, -1])
        return logits, state, cache.k, cache.v, cache.filled

    return block


def core_function(config: HuginnConfig, strategy: CacheStrategy, layout: CacheLayout) -> Callable:
    """(params, k, v, filled, state [B, T, E], injected [B, T, E], positions [B, T], step) ->
    (state, k, v, filled): one recurrence of the core."""

    def core(params: dict, k: Array, v: Array, filled: Array, state: Array, injected: Array, positions: Array,
             step: Array) -> tuple[Array, ...]:
        cache = _cache_of(layout, strategy, k, v, filled)
        state, cache = core_step(params, config, state, injected, TokenPositions.create(positions, config), step, cache)
        return state, cache.k, cache.v, cache.filled

    return core


def compile_step(settings: PlanSettings, place: Placement, kind: str, batch: int, positions: int,
                 decoded: int) -> Compiled:
    """The step program `kind` ("block" or "core") for `batch` rows of `positions` positions."""
    config = place.config
    strategy = _timing_strategy(settings.cache_lookup_strategy, config.n_layers_in_recurrent_block)
    max_steps = max(settings.num_steps, settings.draft_steps, settings.inner_recurrence)
    cache = place.cache(strategy, max_steps, batch, settings.context, settings.dtype)
    layout = CacheLayout.create(config, strategy, max_steps)
    rows = lambda shape, dtype: place.rows(jax.ShapeDtypeStruct(shape, dtype))  # noqa: E731
    state = rows((batch, positions, config.n_embd), settings.dtype)
    spots = rows((batch, positions), jnp.int32)
    buffers = (place.params, cache.k, cache.v, cache.filled)
    if kind == "block":
        decode_all = decoded > 1
        fn = block_function(config, strategy, layout, decode_all)
        args = (*buffers, spots, spots, state)
        name = f"block x{positions}" + (" (all decoded)" if decode_all else "")
    else:
        fn = core_function(config, strategy, layout)
        args = (*buffers, state, state, spots, place.replicated(jax.ShapeDtypeStruct((), jnp.int32)))
        name = f"core step x{positions}"
    return compile_program(name, fn, args, batch=batch, positions=positions, mesh=place.mesh, donate=(1, 2, 3))


def pass_seconds(p: roofline.Pass, batch: int, times: dict[tuple[str, int, int, int], float]) -> float:
    """A pass's time from the step programs' times {(kind, batch, positions, decoded): seconds}."""
    positions, decoded = int(p.positions), int(p.decoded)
    block = times[("block", batch, positions, decoded)]
    core = times[("core", batch, positions, positions)] if p.core_steps > 1 else 0.0
    return p.count * (block + (p.core_steps - 1) * core)


def step_programs(steps: Sequence[roofline.SamplerStep], batches: Sequence[int]) -> list[tuple[str, int, int, int]]:
    """The (kind, batch, positions, decoded) programs the steps are made of, each once."""
    keys: dict[tuple[str, int, int, int], None] = {}
    for batch in batches:
        for step in steps:
            for p in step.passes:
                positions, decoded = int(p.positions), int(p.decoded)
                keys[("block", batch, positions, decoded)] = None
                if p.core_steps > 1:
                    keys[("core", batch, positions, positions)] = None
    return list(keys)


def sampler_steps(settings: PlanSettings, rates: Rates) -> list[roofline.SamplerStep]:
    """The steps a plan projects: the prefill (prompt tokens), static AR, adaptive AR, a speculative
    round, the diffusion sampler's fixed freeze (one token per step on a window of r / r' + 2
    positions) and the paper's setting (the rates' tokens per step on the window of their mean
    wavefront), and one diffusion step at each of `wavefronts` (as if it froze one token). Every
    pass reads the full `context`."""
    s, c = settings, settings.context
    fixed_window = window_for(-(-s.num_steps // s.inner_recurrence) + 2, s.max_wavefront)
    paper_window = window_for(math.ceil(rates.diffusion_wavefront), s.max_wavefront)
    steps = [
        roofline.prefill(s.num_steps, s.prompt_tokens),
        roofline.static_ar_token(s.num_steps, c),
        roofline.adaptive_token(rates.adaptive_mean_steps, c),
        roofline.speculative_round(s.num_steps, s.draft_steps, s.lookahead, rates.speculative_tokens_per_round, c),
        roofline.diffusion_step(s.inner_recurrence, fixed_window, 1.0, c, "diffusion, fixed freeze"),
        roofline.diffusion_step(s.inner_recurrence, paper_window, rates.diffusion_tokens_per_step, c,
                                "diffusion, paper-main"),
    ]
    steps += [roofline.diffusion_step(s.inner_recurrence, w, 1.0, c, "diffusion step, 1 token/step")
              for w in s.wavefronts]
    # the step programs' cache holds the whole context, the prefill's too
    steps[0] = dataclasses.replace(steps[0], passes=(dataclasses.replace(steps[0].passes[0], context=c),))
    return steps


# ---------------------------------------------------------------- sampler programs

def compile_samplers(settings: PlanSettings, place: Placement, batch: int,
                     names: Sequence[str] = ("ar", "adaptive", "speculative", "diffusion")) -> list[Compiled]:
    """The samplers' own programs for `batch` rows of `prompt_tokens` on the mesh (see the module
    docstring); each on a cache of `context` positions."""
    s, config = settings, place.config
    compiled = []
    prompts = np.ones((batch, s.prompt_tokens), np.int32)
    host = setup(place.params, prompts, config, max_new_tokens=s.new_tokens, init_scale=1.0, sampling=GREEDY,
                 stop_token_ids=None, key=jax.random.key(0), random=False, random_why="")
    common = (place.rows(host.prompts), place.rows(host.lengths), place.rows(host.keys))
    stops = place.replicated(host.stops)
    scalar = lambda dtype: place.replicated(jax.ShapeDtypeStruct((), dtype))  # noqa: E731
    sampling = place.replicated(jax.tree.map(jnp.asarray, GREEDY))
    for name in names:
        if name in ("ar", "adaptive"):
            cache = place.cache(s.cache_lookup_strategy, s.num_steps, batch, s.context, s.dtype)
            if name == "ar":
                prompt_rule = token_rule = FixedDepth(scalar(jnp.int32))
            else:
                token_rule = AdaptiveExit(criterion=get_criterion("latent-diff"), threshold=scalar(jnp.float32),
                                          max_steps=scalar(jnp.int32), min_steps=scalar(jnp.int32),
                                          check_every=scalar(jnp.int32), vocab_size=config.vocab_size)
                prompt_rule = token_rule
            args = (place.params, cache, *common, scalar(jnp.float32), sampling, stops, prompt_rule, token_rule,
                    scalar(jnp.int32))
            static = dict(config=config, max_new_tokens=s.new_tokens, continuous_compute=False,
                          resume_from_latents=name == "ar", stream=False)
            compiled.append(compile_program(f"sampler: {'static' if name == 'ar' else 'adaptive'} AR loop",
                                            autoregressive._decode, args, batch=batch, mesh=place.mesh, donate=(1,),
                                            static=static))
        elif name == "speculative":
            new = s.context - s.prompt_tokens - s.lookahead + 1
            cache = place.cache(s.cache_lookup_strategy, s.num_steps, batch, s.context, s.dtype)
            depth = (scalar(jnp.int32), scalar(jnp.int32), scalar(jnp.float32))
            args = (place.params, cache, common[0], common[1], depth, scalar(jnp.float32), sampling, stops, common[2],
                    scalar(jnp.int32))
            static = dict(config=config, max_new_tokens=new, lookahead=s.lookahead, continuous_compute=False,
                          stream=False)
            compiled.append(compile_program("sampler: speculative rounds", speculative._generate, args, batch=batch,
                                            mesh=place.mesh, donate=(1,), static=static))
        elif name == "diffusion":
            compiled += _compile_diffusion(s, place, batch, common, stops, sampling)
        else:
            raise PlanError(f"unknown sampler program {name!r}; choose from ar, adaptive, speculative, diffusion")
    return compiled


def _compile_diffusion(s: PlanSettings, place: Placement, batch: int, common: tuple, stops: Any,
                       sampling: Any) -> list[Compiled]:
    """The diffusion sampler's start (prefill, first wavefront) and one phase of its steps on the
    widest window (max_wavefront) and the whole context, at the paper-main setting."""
    new = s.context - s.prompt_tokens - s.max_wavefront - 1
    settings = DiffusionSettings.create(
        num_steps=s.num_steps, inner_recurrence=s.inner_recurrence, freeze_rule=FREEZE_STRATEGIES.index("latent-diff"),
        exit_t=0.03, ema_embeds=0.1, state_noise_mixing=0.0, dampened_state_mixer=True, sqrt_mixer=False,
        continuous_compute=False, reference_compatible=False, init_scale=1.0, max_diffusion_steps=4096)
    plan = DiffusionPlan(headway=1, ring=s.max_wavefront, full_prefill=True, max_new_tokens=new, tablet_rows=0)
    ctx = DiffusionContext(params=place.params, settings=place.replicated(settings), sampling=sampling, stops=stops,
                           keys=common[2], stream_number=place.replicated(jax.ShapeDtypeStruct((), jnp.int32)),
                           config=place.config, plan=plan, stream=False)
    cache = place.cache(SHARED if s.cache_lookup_strategy == FULL else s.cache_lookup_strategy,
                        max(s.num_steps, s.inner_recurrence), batch, s.context, s.dtype)
    start = compile_program("sampler: diffusion start", diffusion_loop.start, (ctx, cache, common[0], common[1]),
                            batch=batch, mesh=place.mesh, donate=(1,))
    with sharding.use(place.mesh):
        carry = jax.eval_shape(diffusion_loop.start, ctx, cache, common[0], common[1])
    carry = jax.tree.map(lambda a: place.rows(a) if a.ndim and a.shape[0] == batch else place.replicated(a), carry)
    carry = carry.replace(cache=cache)
    low = place.replicated(jax.ShapeDtypeStruct((), jnp.int32))
    phase = compile_program(f"sampler: diffusion phase (window {s.max_wavefront})", diffusion_loop.run_phase,
                            (ctx, carry, low), batch=batch, mesh=place.mesh, donate=(1,),
                            static=dict(window=s.max_wavefront, view=s.context))
    return [start, phase]


# ---------------------------------------------------------------- fit and projection

def check_fits(compiled: Compiled, chip: roofline.Chip, settings: PlanSettings, mesh: Mesh) -> None:
    """PlanError if the program needs more HBM per chip than the chip has, saying what to change."""
    if compiled.per_chip_bytes <= chip.hbm_bytes:
        return
    data, model = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
    raise PlanError(
        f"the plan does not fit: {compiled.name} at batch {compiled.batch} needs "
        f"{compiled.per_chip_bytes / roofline.GIB:.2f} GiB per chip, more than the {chip.hbm_bytes / roofline.GIB:.0f} "
        f"GiB of a {chip.name} (mesh data={data}, model={model}; {compiled.argument_bytes / roofline.GIB:.2f} GiB of "
        f"arguments, {compiled.temp_bytes / roofline.GIB:.2f} GiB of temporaries). " + FIT_ADVICE)


def projections(settings: PlanSettings, steps: Sequence[roofline.SamplerStep],
                times: dict[tuple[str, int, int, int], float], chip: roofline.Chip, chips: int) -> list[dict]:
    """Per sampler step and batch: the compiler's time, the tokens/s it projects, and the roofline
    bound of the slice (all chips' bandwidth and FLOPs) for comparison."""
    rows = []
    for batch in settings.batches:
        for step in steps:
            seconds = sum(pass_seconds(p, batch, times) for p in step.passes)
            cost = roofline.step_cost(settings.config, settings.dtype, batch, step)
            tokens = step.tokens_per_row * batch
            rows.append({"step": step.name, "batch": batch, "seconds": seconds,
                         "tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
                         "roofline_tokens_per_s": cost.tokens_per_second(chip, chips),
                         "weight_bytes": cost.weight_bytes, "cache_bytes": cost.cache_bytes,
                         "tokens_per_step": tokens})
    return rows


# ---------------------------------------------------------------- plans of many slices side by side

def gib(n: float) -> str:
    """Bytes as GiB, as every plan table writes them."""
    return f"{n / roofline.GIB:.2f} GiB"


def milliseconds(seconds: float | None) -> str:
    """A compiler time as the plan tables write it; "n/a" where the compiler gave none."""
    return "n/a" if seconds is None or not math.isfinite(seconds) else f"{1e3 * seconds:.3g} ms"


SUMMARY_STEPS = {"static AR r=": "static AR", "adaptive AR": "adaptive AR", "self-speculative": "self-speculative",
                 "diffusion, fixed freeze": "diffusion, fixed freeze", "diffusion, paper-main": "diffusion, paper-main"}


def summary_rows(plan_record: dict) -> list[dict]:
    """Per batch of one plan (the JSON `tpu_plan --output` writes): the projected tokens/s of each
    sampler (`SUMMARY_STEPS`), paper-main diffusion against static AR, and the largest step program's
    memory per chip; for comparing slices side by side."""
    rows = []
    for batch in plan_record["settings"]["batches"]:
        row = {"topology": plan_record["topology"], "devices": plan_record["devices"], "mesh": plan_record["mesh"],
               "batch": batch, "tokens_per_s": {}}
        for step in plan_record["projections"]:
            label = next((v for k, v in SUMMARY_STEPS.items() if step["step"].startswith(k)), None)
            if label and step["batch"] == batch:
                row["tokens_per_s"][label] = step["tokens_per_s"]
        tps = row["tokens_per_s"]
        row["diffusion_vs_ar"] = tps["diffusion, paper-main"] / tps["static AR"]
        steps = [p for p in plan_record["programs"] if p["batch"] == batch and p["positions"]]
        row["most_bytes_per_chip"] = max(p["per_chip_bytes"] for p in steps)
        row["hbm_bytes"] = plan_record["chip"]["hbm_bytes"]
        rows.append(row)
    return rows
