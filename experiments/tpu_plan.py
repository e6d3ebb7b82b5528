"""A TPU plan without a TPU: every sampler compiled for a TPU slice, its memory per chip against the
chip's HBM, the compiler's time per step, and the tokens/s that projects (compiler estimates).

    pip install -e '.[tpu]'      # libtpu (about 700 MB); the compilation runs on this machine's CPU
    python -m experiments.tpu_plan --topology=v5e:2x4
    python -m experiments.tpu_plan --topology=v5e:2x4 --mesh=2,4 --batch=8,32 --context=2048
    python -m experiments.tpu_plan --topology=v5e:2x2 --profile=tiny --batch=4 --output=plan.json

What it compiles (see `samplers.plan`), on a (data, model) mesh of the slice's devices (default:
all on the model axis) under the project's sharding rules:
- step programs, for the time: a block (prelude, one core step, coda, head) and a core step, at
  one position per row (static and adaptive AR, speculative drafts), at the speculative lookahead,
  at the prompt (prefill) and at the diffusion wavefronts (`--wavefronts`, and the windows of the
  fixed freeze and of the paper's setting), each for every `--batch`;
- last, after the projections are printed, the samplers' own programs (`--samplers`), for the
  memory a run needs and as the check that each compiles for the mesh.
Each program's memory per chip is printed against the chip's HBM; one that does not fit stops
the plan with what to change. Times are the compiler's `optimal_seconds` (corrected as
`samplers.plan` explains); a sampler step costs its block passes (static AR r=32: block + 31 core
steps per token, so AR tokens/s = B / (32 x core step + prelude/coda/head)); a diffusion step
yields the `--diffusion_tokens_per_step` of the paper's setting on its mean wavefront, the fixed
freeze one token per step. Those rates, the adaptive depth and the speculative acceptance are a
trained model's: by default the embedded arithmetic model's, measured by `--measure_rates=N`.
"""

from __future__ import annotations

import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no accelerator here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags, logging  # noqa: E402

from experiments.common import quiet_jax_logs  # noqa: E402
from huginn_jax import cli, roofline, sharding  # noqa: E402
from huginn_jax.config import PRESETS, preset  # noqa: E402
from samplers import plan  # noqa: E402

EMBEDDED_RATES = plan.EMBEDDED_RATES

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, "The TPU slice, as libtpu names it: v5e:1x1, v5e:2x2, v5e:2x4, v4:2x2x1, "
                    "v5p:2x2x1, v6e:2x4, ...")
flags.DEFINE_string("mesh", "", "DATA,MODEL (e.g. 1,8): rows over DATA, heads/MLP/vocabulary over MODEL; "
                    "default: every device on MODEL.")
flags.DEFINE_enum("profile", "huginn-0125", sorted(PRESETS), "The model shape.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and cache dtype.")
flags.DEFINE_list("batch", ["1", "32"], "Batch sizes (rows).")
flags.DEFINE_integer("prompt_tokens", 128, "Prompt length of the prefill and of the sampler programs.")
flags.DEFINE_integer("context", 1024, "Cache positions of every program: prompt, new tokens and lookahead.")
flags.DEFINE_integer("num_steps", 32, "Recurrence r of static AR, the prefill, the adaptive cap and the verifier.")
flags.DEFINE_string("cache_lookup_strategy", "latest-m4-compress-s4", "KV cache strategy of every program "
                    "('full': a slot per core step, 16.5x the cache at r=32).")
flags.DEFINE_list("wavefronts", ["8", "32", "128"], "Diffusion wavefronts to time one step at.")
flags.DEFINE_integer("max_wavefront", 128, "The diffusion sampler's max_wavefront (its ring buffer and widest window).")
flags.DEFINE_list("samplers", ["ar", "adaptive", "speculative", "diffusion"], "Sampler programs to compile for "
                  "memory (empty: none).")
flags.DEFINE_float("adaptive_mean_steps", EMBEDDED_RATES["adaptive_mean_steps"],
                   "Core steps per token of adaptive AR (latent-diff 0.03); default: the embedded model's.")
flags.DEFINE_float("speculative_tokens_per_round", EMBEDDED_RATES["speculative_tokens_per_round"],
                   "Tokens per self-speculative round (4 drafts of 4 steps); default: the embedded model's.")
flags.DEFINE_float("diffusion_tokens_per_step", EMBEDDED_RATES["diffusion_tokens_per_step"],
                   "Tokens frozen per diffusion step, paper-main setting; default: the embedded model's.")
flags.DEFINE_float("diffusion_wavefront", EMBEDDED_RATES["diffusion_wavefront"],
                   "Mean wavefront of the paper-main setting; default: the embedded model's.")
flags.DEFINE_integer("measure_rates", 0, "Measure the four rates above on this many held-out problems of the "
                     "embedded model first (CPU; minutes), instead of the flags.")
flags.DEFINE_string("output", None, "Also write the plan as JSON to this file.")


def int_list(flag: str, values: list[str], minimum: int = 1) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        raise cli.UsageError(f"--{flag}={','.join(values)} must be comma-separated integers") from None
    if not numbers or min(numbers) < minimum:
        raise cli.UsageError(f"--{flag} needs integers >= {minimum}, got {','.join(values) or 'nothing'}")
    return numbers


def measured_rates(problems: int, num_steps: int) -> plan.Rates:
    """The rates of the embedded model's samplers on its first `problems` held-out problems."""
    from experiments.common import load_task_model
    from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, heldout_problems
    from samplers.arithmetic_table import sampler_table, table_rows

    config, params, tokenizer = load_task_model(EMBEDDED_MODEL)
    rows = {name: row for name, row in table_rows(num_steps).items()
            if name in ("adaptive", "diffusion-main", "speculative")}
    table = {r["row"]: r for r in sampler_table(params, config, tokenizer, list(heldout_problems()[:problems]), rows,
                                                max_new_tokens=10, num_steps=num_steps, seed=0)}
    return plan.Rates(adaptive_mean_steps=table["adaptive"]["mean_recurrence_per_token"],
                      speculative_tokens_per_round=table["speculative"]["tokens_per_round"],
                      diffusion_tokens_per_step=table["diffusion-main"]["tokens_per_sampler_step"],
                      diffusion_wavefront=table["diffusion-main"]["mean_wavefront"],
                      source=f"measured now on the embedded arithmetic model, {problems} held-out problems")


def main(argv: list[str]) -> None:
    if not FLAGS.topology:
        raise cli.UsageError("--topology is required: a TPU slice such as v5e:2x4 (libtpu's names)")
    quiet_jax_logs()
    try:
        mesh_shape = sharding.parse_mesh(FLAGS.mesh)
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    batches = int_list("batch", FLAGS.batch)
    wavefronts = int_list("wavefronts", FLAGS.wavefronts)
    config = preset(FLAGS.profile)
    settings = plan.PlanSettings(config=config, dtype=jnp.dtype(FLAGS.dtype), prompt_tokens=FLAGS.prompt_tokens,
                                 context=FLAGS.context, num_steps=FLAGS.num_steps,
                                 cache_lookup_strategy=FLAGS.cache_lookup_strategy, batches=batches,
                                 wavefronts=wavefronts, max_wavefront=FLAGS.max_wavefront).check()
    unknown = set(FLAGS.samplers) - {"ar", "adaptive", "speculative", "diffusion"}
    if unknown:
        raise cli.UsageError(f"--samplers: unknown {sorted(unknown)}; choose from ar, adaptive, speculative, diffusion")
    if FLAGS.measure_rates:
        rates = measured_rates(FLAGS.measure_rates, FLAGS.num_steps)
    else:
        rates = plan.Rates(FLAGS.adaptive_mean_steps, FLAGS.speculative_tokens_per_round,
                           FLAGS.diffusion_tokens_per_step, FLAGS.diffusion_wavefront,
                           source="flags" if any(FLAGS[name].present for name in EMBEDDED_RATES)
                           else "the embedded arithmetic model (measured, see EMBEDDED_RATES)")

    started = time.perf_counter()
    try:
        devices = plan.tpu_devices(FLAGS.topology)
        mesh = plan.plan_mesh(devices, mesh_shape)
    except plan.PlanOptionError as err:
        raise cli.UsageError(str(err)) from None
    chip = plan.chip_of(devices)
    for batch in batches:
        try:
            sharding.check_batch(batch, mesh, "rows")
        except ValueError as err:
            raise cli.UsageError(f"--batch={batch}: {err}") from None
    place = plan.Placement.create(config, settings.dtype, mesh)
    data, model = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
    padded = place.config.kv_head_padding
    print(f"## TPU plan: {FLAGS.topology} = {len(devices)} x {devices[0].device_kind} "
          f"({chip.hbm_bytes / roofline.GIB:.0f} GiB HBM, {chip.hbm_bandwidth / 1e9:.0f} GB/s, "
          f"{chip.bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip)\n")
    print(f"mesh data={data} x model={model}; {FLAGS.profile}, {FLAGS.dtype}"
          + (f", kv heads padded {config.num_key_value_heads} -> {place.config.stored_kv_heads}" if padded else "")
          + f"; prompt {settings.prompt_tokens} tokens, cache of {settings.context} positions "
          f"({settings.cache_lookup_strategy}); rates: {rates.source}\n", flush=True)

    steps = plan.sampler_steps(settings, rates)
    compiled: list[plan.Compiled] = []
    times: dict[tuple[str, int, int, int], float] = {}
    print("| program | batch | memory per chip | of HBM | compiler time | compiled in |\n|---|---|---|---|---|---|")

    def record(key: tuple | None, program: plan.Compiled) -> None:
        compiled.append(program)
        print(f"| {program.name} | {program.batch} | {plan.gib(program.per_chip_bytes)} | "
              f"{100 * program.per_chip_bytes / chip.hbm_bytes:.0f} % | {plan.milliseconds(program.seconds)} | "
              f"{program.compile_seconds:.0f} s |", flush=True)
        plan.check_fits(program, chip, settings, mesh)
        if key is not None:
            if program.seconds is None:
                raise plan.PlanError(f"the compiler gave no usable time for {program.name} at batch {program.batch} "
                                     f"(optimal_seconds={program.optimal_seconds})")
            times[key] = program.seconds

    for key in plan.step_programs(steps, batches):
        kind, batch, positions, decoded = key
        record(key, plan.compile_step(settings, place, kind, batch, positions, decoded))
    rows = plan.projections(settings, steps, times, chip, len(devices))
    ar = {r["batch"]: r for r in rows if r["step"].startswith("static AR")}
    print("\n| sampler step | batch | compiler time per step | tokens/step | tokens/s | vs static AR "
          "| roofline tokens/s of the slice |\n|---|---|---|---|---|---|---|")
    for r in rows:
        prefill = r["step"].startswith("prefill")
        r["vs_static_ar"] = None if prefill else r["tokens_per_s"] / ar[r["batch"]]["tokens_per_s"]
        print(f"| {r['step']} | {r['batch']} | {plan.milliseconds(r['seconds'])} | {r['tokens_per_step']:.3g} | "
              f"{r['tokens_per_s']:.4g} | {'-' if prefill else format(r['vs_static_ar'], '.2f') + 'x'} | "
              f"{r['roofline_tokens_per_s']:.4g} |")
    if FLAGS.samplers:  # the projections come first: the samplers' own programs take longest to compile
        print("\n| sampler program | batch | memory per chip | of HBM | compiler time | compiled in |\n"
              "|---|---|---|---|---|---|", flush=True)
    for batch in batches:
        for program in plan.compile_samplers(settings, place, batch, FLAGS.samplers):
            record(None, program)
    elapsed = time.perf_counter() - started
    print(f"\n{len(compiled)} programs compiled in {elapsed:.0f} s on {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}), jax {jax.__version__}")
    if FLAGS.output:
        result = {"topology": FLAGS.topology, "devices": len(devices), "device_kind": devices[0].device_kind,
                  "chip": chip.__dict__, "mesh": {"data": data, "model": model}, "profile": FLAGS.profile,
                  "dtype": FLAGS.dtype, "kv_head_padding": padded, "settings": {
                      "prompt_tokens": settings.prompt_tokens, "context": settings.context,
                      "num_steps": settings.num_steps, "cache_lookup_strategy": settings.cache_lookup_strategy,
                      "batches": list(batches), "wavefronts": list(wavefronts)},
                  "rates": rates.__dict__, "programs": [dict(p.__dict__, per_chip_bytes=p.per_chip_bytes,
                                                             seconds=p.seconds) for p in compiled],
                  "projections": rows, "elapsed_seconds": elapsed, "jax": jax.__version__}
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        logging.info("wrote %s", FLAGS.output)


if __name__ == "__main__":
    cli.run(main)
