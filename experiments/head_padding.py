"""How to shard Huginn-0125's 55 heads: measured by compiling one recurrence step for a device mesh.

55 heads divide no power-of-two model axis. Three ways to lay out attention, each exact:
- `replicated`: heads not sharded (what a plain rule-based placement does when the axis does not
  divide them): every device holds and computes all of attention;
- `padded`: 56 heads, the 56th zero (`huginn_jax.sharding.pad_heads`), heads split over the
  model axis (what huginn-jax does);
- `head_dim`: 55 heads, each head's 96 dimensions split over the model axis (8 x 12).
For each, one core step (the adapter and the 4 core blocks, with the KV cache) is compiled for the
mesh from abstract parameters (nothing is allocated), once decoding (1 token per row, the cache
holding `--context` positions) and once as a prefill block (`--block` tokens). It prints per
device what XLA's compiled program reports: parameter and cache bytes (arguments), temporaries,
flops and bytes accessed (`cost_analysis`), and the bytes moved between devices (the results of
all-reduce, all-gather, all-to-all, reduce-scatter and collective-permute in the optimized HLO,
once per step). With `--topology` the programs are compiled for a TPU slice's compile-only
devices (libtpu; no TPU needed) and the compiler also estimates each step's time; without it,
this machine's devices (simulated CPU devices: the counts carry over, there is no time).

    python -m experiments.head_padding --topology=v5e:2x4 --dtype=bfloat16   # BENCHMARKS.md
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.head_padding
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.head_padding --mesh=2,4 --batch=8
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from experiments.common import quiet_jax_logs
from huginn_jax import cli, sharding
from huginn_jax.config import HuginnConfig, preset
from huginn_jax.kv_cache import SHARED, KVCache
from huginn_jax.layers import TokenPositions
from huginn_jax.model import core_step
from huginn_jax.params import abstract_params
from samplers import plan

FLAGS = flags.FLAGS
flags.DEFINE_string("mesh", "", "DATA,MODEL: the mesh to compile for (default: every device on the model axis).")
flags.DEFINE_string("topology", "", "Compile for this TPU slice's compile-only devices (libtpu, e.g. v5e:2x4) "
                    "instead of this machine's devices; the compiler then also estimates each step's time.")
flags.DEFINE_string("profile", "huginn-0125", "Model shape (a preset of huginn_jax.config).")
flags.DEFINE_integer("batch", 1, "Rows (a multiple of the data axis).")
flags.DEFINE_integer("context", 1024, "Cache positions a decoding step attends over.")
flags.DEFINE_integer("block", 256, "Tokens of the prefill block.")
flags.DEFINE_list("layouts", ["replicated", "padded", "head_dim"], "Attention layouts to compare.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and cache dtype (XLA:CPU computes "
                  "bfloat16 products in float32, converting the weights into temporaries; float32 avoids that).")

def layout(name: str, config: HuginnConfig, mesh: Any) -> tuple[HuginnConfig, dict]:
    """(config, rules) of an attention layout."""
    rules = sharding.default_rules(mesh)
    if name == "replicated":
        return config, {k: v for k, v in rules.items() if k not in sharding.HEAD_AXES}
    if name == "padded":
        return config.replace(kv_head_padding=sharding.head_padding(config, mesh, rules)), rules
    if name == "head_dim":
        model = rules["heads"]
        return config, {**{k: v for k, v in rules.items() if k not in sharding.HEAD_AXES}, "head_dim": model}
    raise cli.UsageError(f"--layouts: unknown layout {name!r}; choose from replicated, padded, head_dim")


def compile_step(config: HuginnConfig, rules: dict, mesh: Any, batch: int, tokens: int, context: int,
                 dtype: Any) -> dict:
    """Compiles one core step over `tokens` tokens per row at positions ending at `context` and
    returns its per-device measurements."""
    param_specs = sharding.param_shardings(config, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(config, dtype), param_specs)
    cache = jax.eval_shape(lambda: KVCache.create(config, SHARED, 1, batch, context, dtype))
    cache_specs = sharding.cache_shardings(cache, mesh, rules)
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, cache_specs)
    rows = sharding.batch_sharding(mesh, 3)
    state = jax.ShapeDtypeStruct((batch, tokens, config.n_embd), dtype, sharding=rows)
    positions = jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))

    def step(params: dict, state: jax.Array, injected: jax.Array, positions: jax.Array, cache: KVCache):
        return core_step(params, config, state, injected, TokenPositions.create(positions, config), 0, cache)

    # a fresh function per layout: JAX retraces for a new mesh, not for new rules (sharding.use)
    compiled = plan.compile_program(f"core step x{tokens}", step, (params, state, state, positions, cache),
                                    batch=batch, positions=tokens, mesh=mesh, donate=(4,), rules=rules)
    return {"arguments_mb": compiled.argument_bytes / 2**20, "temporaries_mb": compiled.temp_bytes / 2**20,
            "gflops": compiled.flops / 1e9, "accessed_mb": compiled.bytes_accessed / 2**20,
            "moved_mb": {k: v / 2**20 for k, v in compiled.collective_bytes.items() if v},
            "seconds": compiled.seconds, "compile_s": compiled.compile_seconds}


def devices_and_mesh(topology: str, mesh_flag: str) -> tuple[Any, str]:
    """The mesh to compile for (a TPU slice's compile-only devices, or this process's devices) and
    a name of its devices; usage errors name the flag."""
    try:
        shape = sharding.parse_mesh(mesh_flag)
        if topology:
            devices = plan.tpu_devices(topology)
            return plan.plan_mesh(devices, shape), f"{topology}, {devices[0].device_kind}"
        devices = jax.devices()
        return sharding.make_mesh(shape or (1, len(devices)), devices), devices[0].platform
    except plan.PlanOptionError as err:
        raise cli.UsageError(str(err)) from None
    except plan.PlanError:
        raise
    except ValueError as err:
        raise cli.UsageError(str(err)) from None


def main(argv: list[str]) -> None:
    quiet_jax_logs()
    mesh, where = devices_and_mesh(FLAGS.topology, FLAGS.mesh)
    try:
        sharding.check_batch(FLAGS.batch, mesh, "rows")
    except ValueError as err:
        raise cli.UsageError(f"--batch={FLAGS.batch}: {err}") from None
    data, model = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
    base = preset(FLAGS.profile)
    print(f"{FLAGS.profile}: {base.n_heads} heads of {base.head_dim}, width {base.n_embd}; mesh data={data} x "
          f"model={model} ({where}); one core step (adapter + {base.n_layers_in_recurrent_block} blocks), "
          f"{FLAGS.dtype}, batch {FLAGS.batch}; per device:")
    print("| layout | heads stored | step | parameters + cache MiB | temporaries MiB | GFLOP | accessed MiB | "
          "moved between devices MiB | compiler time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in FLAGS.layouts:
        config, rules = layout(name, base, mesh)
        for step, tokens, context in (("decode", 1, FLAGS.context), ("prefill", FLAGS.block, FLAGS.block)):
            m = compile_step(config, rules, mesh, FLAGS.batch, tokens, context, jnp.dtype(FLAGS.dtype))
            moved = ", ".join(f"{k} {v:.2f}" for k, v in m["moved_mb"].items()) or "0"
            print(f"| {name} | {config.stored_heads} | {step} ({tokens} token{'s' * (tokens > 1)}, {context} cached) | "
                  f"{m['arguments_mb']:.1f} | {m['temporaries_mb']:.1f} | {m['gflops']:.2f} | {m['accessed_mb']:.1f} | "
                  f"{moved} | {plan.milliseconds(m['seconds'])} |", flush=True)


if __name__ == "__main__":
    cli.run(main)
