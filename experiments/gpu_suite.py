"""The GPU run, ready to go: the samplers side by side on the Huginn-0125 shape (bfloat16, random
weights), the embedded model's sampler table, and the fraction of the roofline each reaches.

    python -m experiments.gpu_suite                     # one H100 or H200: under 8 minutes
    python -m experiments.gpu_suite --profile=tiny --table_problems=4 --output_dir=/tmp/suite   # CPU

Measured in one process, each after a first (compiling) call, the median of `--repeats` calls,
end to end (prefill included), greedy, `init_scale=0`, no stop tokens:
- static AR at r=32 with a slot per step (`full`) and with the shared cache
  (`latest-m4-compress-s4`), batch 1;
- adaptive AR (latent-diff 0.03, at most 32 steps; `latest-m4`), batch 1;
- the diffusion sampler with the fixed freeze (Algorithm 1: r'=4, no noise or momentum, one token
  per step once the wave is full) and with the paper's setting (`paper-main`), batch 1, and the
  fixed freeze at batch 8 and 32 (random weights barely converge, so the fixed freeze is what
  measures the sampler's parallelism; the paper's run is capped at `--max_diffusion_steps`);
- the embedded arithmetic model's sampler table (`samplers.arithmetic_table`), batch 1.

Roofline (`huginn_jax.roofline`): for each run the weight and cache bytes its passes read (the
prefill, then every token's or sampler step's pass at the mean context) over the measured time,
against the chip's HBM bandwidth (`hbm_fraction`), and the roofline time max(bytes / bandwidth,
FLOPs / peak) over the measured time (`roofline_fraction`). The chip is the device's own
(`--chip` names another one, for a CPU run).

Writes `gpu_suite.json` (every record) and `gpu_suite.md` (the tables) under `--output_dir`, and
prints the tables. `--budget_seconds` stops starting new measurements once that much time has
passed (the rest are marked as not run), so that the command ends in time on a slower machine.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments.common import load_task_model, quiet_jax_logs
from huginn_jax import cli, roofline
from huginn_jax.config import HUGINN_0125, TINY, HuginnConfig
from huginn_jax.kv_cache import SHARED
from huginn_jax.params import init_params
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, heldout_problems
from samplers import generate_diffusion_style, generate_minimal, generate_with_adaptive_compute
from samplers.arithmetic_table import ROW_NAMES, sampler_table, table_rows
from samplers.benchmark_profile import BenchmarkProfile
from samplers.diffusion import PRESETS


PROFILES = {
    "huginn-0125": BenchmarkProfile(HUGINN_0125, jnp.bfloat16, prompt_tokens=32, new_tokens=64, num_steps=32),
    "tiny": BenchmarkProfile(TINY, jnp.float32, prompt_tokens=8, new_tokens=8, num_steps=8),
}

RUN_KEYS = ("ar-full", "ar-shared", "diffusion-fixed", "adaptive", "diffusion-fixed-b8", "diffusion-fixed-b32",
            "diffusion-paper")

FLAGS = flags.FLAGS
flags.DEFINE_enum("profile", "huginn-0125", sorted(PROFILES), "Model shape and dtype of the random-weight runs.")
flags.DEFINE_integer("new_tokens", None, "New tokens per sequence (default: the profile's).")
flags.DEFINE_list("runs", list(RUN_KEYS), "Random-weight runs to measure, in this order: " + ", ".join(RUN_KEYS) + ".")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement; the median is reported.")
flags.DEFINE_integer("max_diffusion_steps", 256, "Cap on the sampler steps of the paper-setting run (random "
                     "weights converge slowly).")
flags.DEFINE_integer("table_problems", 100, "Held-out problems of the embedded model's sampler table (0: none).")
flags.DEFINE_list("table", list(ROW_NAMES), "Rows of the embedded model's sampler table.")
flags.DEFINE_enum("chip", None, sorted(roofline.CHIPS), "The chip whose roofline the fractions use (default: the "
                  "device's own; none on a CPU).")
flags.DEFINE_float("budget_seconds", 450.0, "Start no new measurement after this many seconds.")
flags.DEFINE_string("output_dir", "benchmarks/gpu_suite", "Where gpu_suite.json and gpu_suite.md go.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.")


@dataclasses.dataclass(frozen=True)
class Measurement:
    key: str  # its name in --runs
    name: str
    sampler: Callable[..., Any]
    batch: int
    options: dict[str, Any]


def measurements(num_steps: int, max_diffusion_steps: int) -> list[Measurement]:
    """The random-weight runs, in the order they run (`RUN_KEYS`)."""
    fixed = dict(freeze_strategy="fixed", inner_recurrence=4, state_noise_mixing=0.0, ema_embeds=0.0, headway=1,
                 max_wavefront=128, cache_lookup_strategy=SHARED, num_steps=num_steps)
    fixed_name = "diffusion, fixed freeze (r'=4)"
    return [
        Measurement("ar-full", f"static AR r={num_steps}, full cache", generate_minimal, 1,
                    dict(num_steps=num_steps, cache_lookup_strategy="full")),
        Measurement("ar-shared", f"static AR r={num_steps}, shared cache", generate_minimal, 1,
                    dict(num_steps=num_steps, cache_lookup_strategy=SHARED)),
        Measurement("diffusion-fixed", fixed_name, generate_diffusion_style, 1, fixed),
        Measurement("adaptive", "adaptive AR (latent-diff 0.03)", generate_with_adaptive_compute, 1,
                    dict(num_steps=num_steps, criterion="latent-diff", exit_threshold=0.03,
                         cache_lookup_strategy="latest-m4")),
        Measurement("diffusion-fixed-b8", fixed_name, generate_diffusion_style, 8, fixed),
        Measurement("diffusion-fixed-b32", fixed_name, generate_diffusion_style, 32, fixed),
        Measurement("diffusion-paper", "diffusion, paper-main (r'=4, latent-diff 0.03)", generate_diffusion_style, 1,
                    dict(PRESETS["paper-main"], num_steps=num_steps, max_diffusion_steps=max_diffusion_steps)),
    ]


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(seconds of the first call, which compiles; median seconds of `repeats` more; last result)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return first, statistics.median(seconds), result


def mean_wavefront(stats: dict, prompt_tokens: int, inner_recurrence: int) -> float:
    """Positions per diffusion step, averaged over rows (`num_tokens_forward` counts the prompt
    once, then r' x the wavefront at every step)."""
    positions = (np.asarray(stats["num_tokens_forward"]) - prompt_tokens) / inner_recurrence
    return float(np.mean(positions / np.maximum(np.asarray(stats["diffusion_steps"]), 1)))


def run_cost(profile: BenchmarkProfile, m: Measurement, out: Any) -> roofline.Cost:
    """The weight and cache bytes and FLOPs a run's passes read and do: the prefill, then each
    token's pass (AR) or each sampler step's (diffusion) at the run's mean context."""
    config, dtype, batch = profile.config, profile.dtype, m.batch
    prompt, generated = profile.prompt_tokens, int(np.max(out.lengths))
    depth = m.options["num_steps"]
    cost = roofline.step_cost(config, dtype, batch, roofline.SamplerStep(
        "prefill", (roofline.Pass(prompt, depth, 1, prompt),), 1.0))
    stats = out.stats
    if "diffusion_steps" in stats:
        steps = int(np.max(stats["diffusion_steps"]))
        wavefront = mean_wavefront(stats, prompt, m.options["inner_recurrence"])
        context = prompt + generated / 2 + wavefront / 2
        step = roofline.diffusion_step(m.options["inner_recurrence"], wavefront, 0.0, context)
        cost = cost + roofline.step_cost(config, dtype, batch, step).scaled(steps)
    else:
        steps = out.recurrence_steps[:, 1:][out.tokens[:, 1:] >= 0]  # tokens after the prefill's
        mean_depth = float(steps.mean()) if steps.size else 0.0
        token = roofline.SamplerStep("token", (roofline.Pass(1, mean_depth, 1, prompt + generated / 2),), 0.0)
        cost = cost + roofline.step_cost(config, dtype, batch, token).scaled(generated - 1)
    return dataclasses.replace(cost, tokens=float(np.sum(out.lengths)))


def fractions(cost: roofline.Cost, seconds: float, chip: roofline.Chip | None) -> dict[str, float | None]:
    """Bytes per second against the chip's bandwidth, and the roofline time against the measured one."""
    if chip is None:
        return {"hbm_fraction": None, "roofline_fraction": None, "roofline_tokens_per_s": None}
    return {"hbm_fraction": cost.bytes / seconds / chip.hbm_bandwidth,
            "roofline_fraction": cost.seconds(chip) / seconds,
            "roofline_tokens_per_s": cost.tokens / cost.seconds(chip)}


def table_costs(profile_config: HuginnConfig, dtype: Any, row: dict, num_steps: int, context: float,
                chip: roofline.Chip | None) -> dict[str, float | None]:
    """The roofline of an embedded-table row, per generated token in steady state (no prefill)."""
    if "tokens_per_sampler_step" in row:
        step = roofline.diffusion_step(row["options"]["inner_recurrence"], row["mean_wavefront"],
                                       row["tokens_per_sampler_step"], context)
    elif "tokens_per_round" in row:
        o = row["options"]
        step = roofline.speculative_round(num_steps, o["draft_steps"], o["lookahead_for_draft"],
                                          row["tokens_per_round"], context)
    else:
        step = roofline.adaptive_token(row["mean_recurrence_per_token"], context)
    cost = roofline.step_cost(profile_config, dtype, 1, step)
    per_token = cost.scaled(1 / max(cost.tokens, 1e-9))
    seconds = 1 / row["tokens_per_second"]
    return {"bytes_per_token": per_token.bytes, **fractions(dataclasses.replace(per_token, tokens=1.0), seconds, chip)}


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def markdown(records: list[dict], table: list[dict], header: str) -> str:
    lines = [header, "", "| run | batch | tokens/s | vs static AR (full) | recurrence / token | diffusion steps | "
             "mean wavefront | weight + cache bytes / token | roofline tokens/s | of HBM bandwidth | of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r for r in records if "full cache" in r["name"] and "tokens_per_s" in r), None)
    for r in records:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['name']} | {r['batch']} | not run ({r['skipped']}) | | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
        roof = "n/a" if r["roofline_tokens_per_s"] is None else f"{r['roofline_tokens_per_s']:.4g}"
        wavefront = f"{r['mean_wavefront']:.1f}" if "mean_wavefront" in r else ""
        lines.append(f"| {r['name']} | {r['batch']} | {r['tokens_per_s']:.4g} | {ratio} | {r['mean_recurrence']:.1f} | "
                     f"{r.get('diffusion_steps', '')} | {wavefront} | "
                     f"{roofline.format_bytes(r['bytes'] / r['tokens'])} | "
                     f"{roof} | {percent(r['hbm_fraction'])} | {percent(r['roofline_fraction'])} |")
    if table:
        lines += ["", "Embedded arithmetic model, every problem at batch 1 (steady-state roofline per token):", "",
                  "| sampler | accuracy | tokens/s | vs static AR | recurrence / token | bytes / token | of HBM "
                  "bandwidth |", "|---|---|---|---|---|---|---|"]
        for t in table:
            lines.append(f"| {t['label']} | {100 * t['accuracy']:.1f} % | {t['tokens_per_second']:.1f} | "
                         f"{t.get('speedup_vs_ar', float('nan')):.2f}x | {t['mean_recurrence_per_token']:.1f} | "
                         f"{roofline.format_bytes(t['bytes_per_token'])} | {percent(t['hbm_fraction'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    for flag, known in (("table", ROW_NAMES), ("runs", RUN_KEYS)):
        unknown = set(FLAGS[flag].value) - set(known)
        if unknown:
            raise cli.UsageError(f"--{flag}: unknown {sorted(unknown)}; choose from {', '.join(known)}")
    for name in ("repeats", "table_problems", "max_diffusion_steps"):
        if FLAGS[name].value < (1 if name == "repeats" else 0):
            raise cli.UsageError(f"--{name}={FLAGS[name].value} must be {'positive' if name == 'repeats' else '>= 0'}")
    quiet_jax_logs()
    started = time.perf_counter()
    profile = PROFILES[FLAGS.profile]
    if FLAGS.new_tokens is not None:
        if FLAGS.new_tokens < 2:
            raise cli.UsageError(f"--new_tokens={FLAGS.new_tokens} must be at least 2")
        profile = dataclasses.replace(profile, new_tokens=FLAGS.new_tokens)
    device = jax.devices()[0]
    chip = roofline.CHIPS[FLAGS.chip] if FLAGS.chip else roofline.chip_for(device.device_kind)
    output_dir = Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    described = (f"{device.device_kind} ({device.platform}, {platform.machine()}), jax {jax.__version__}; roofline: "
                 + (f"{chip.name}, {chip.hbm_bandwidth / 1e12:.3g} TB/s, {chip.bf16_flops / 1e12:.0f} TFLOP/s"
                    if chip else "none (unknown chip)"))
    logging.info("%s", described)

    config = profile.config
    params = init_params(config, jax.random.key(FLAGS.seed), profile.dtype)
    rng = np.random.default_rng(FLAGS.seed)
    records = []
    for m in (m for m in measurements(profile.num_steps, FLAGS.max_diffusion_steps) if m.key in FLAGS.runs):
        record: dict[str, Any] = {"run": m.key, "name": m.name, "batch": m.batch, "options": m.options}
        if time.perf_counter() - started > FLAGS.budget_seconds:
            record["skipped"] = f"past --budget_seconds={FLAGS.budget_seconds:g}"
            records.append(record)
            continue
        prompt = rng.integers(0, min(config.vocab_size, 65504), (m.batch, profile.prompt_tokens), dtype=np.int32)
        logging.info("%s, batch %d", m.name, m.batch)
        first, seconds, out = timed(
            lambda: m.sampler(params, prompt, config=config, max_new_tokens=profile.new_tokens, init_scale=0.0,
                              stop_token_ids=(), key=jax.random.key(FLAGS.seed), **m.options), FLAGS.repeats)
        cost = run_cost(profile, m, out)
        generated = out.tokens >= 0
        record.update(seconds=seconds, first_call_seconds=first, tokens=int(generated.sum()),
                      tokens_per_s=float(generated.sum()) / seconds,
                      mean_recurrence=float(out.recurrence_steps[generated].mean()),
                      bytes=cost.bytes, weight_bytes=cost.weight_bytes, cache_bytes=cost.cache_bytes, flops=cost.flops,
                      **fractions(cost, seconds, chip))
        if "diffusion_steps" in out.stats:
            stats = out.stats
            record["diffusion_steps"] = int(np.max(stats["diffusion_steps"]))
            record["mean_wavefront"] = mean_wavefront(stats, profile.prompt_tokens, m.options["inner_recurrence"])
        records.append(record)
        logging.info("  %.4g tokens/s (first call %.1f s)", record["tokens_per_s"], first)

    table = []
    if FLAGS.table_problems and FLAGS.table:
        if time.perf_counter() - started > FLAGS.budget_seconds:
            records.append({"name": "embedded model's sampler table", "batch": 1,
                            "skipped": f"past --budget_seconds={FLAGS.budget_seconds:g}"})
        else:
            task_config, task_params, tokenizer = load_task_model(EMBEDDED_MODEL)
            rows = table_rows(32)
            table = sampler_table(task_params, task_config, tokenizer, list(heldout_problems()[: FLAGS.table_problems]),
                                  {name: rows[name] for name in FLAGS.table}, max_new_tokens=10, num_steps=32,
                                  seed=FLAGS.seed, progress=False)
            for row in table:
                row.update(table_costs(task_config, jnp.float32, row, 32, 20.0, chip))

    elapsed = time.perf_counter() - started
    header = (f"## GPU suite: {FLAGS.profile} ({jnp.dtype(profile.dtype).name}, random weights), prompt "
              f"{profile.prompt_tokens} tokens, {profile.new_tokens} new tokens, r={profile.num_steps}\n\n"
              f"{described}; {elapsed:.0f} s in all")
    text = markdown(records, table, header)
    command = "python -m experiments.gpu_suite " + " ".join(
        f"--{name}={FLAGS[name].serialize().split('=', 1)[1]}" for name in
        ("profile", "runs", "repeats", "max_diffusion_steps", "table_problems", "table", "budget_seconds")
        if FLAGS[name].present)
    result = {"command": command.strip(), "device": described, "profile": FLAGS.profile,
              "dtype": jnp.dtype(profile.dtype).name, "prompt_tokens": profile.prompt_tokens,
              "new_tokens": profile.new_tokens, "num_steps": profile.num_steps,
              "chip": None if chip is None else dataclasses.asdict(chip), "elapsed_seconds": elapsed,
              "runs": records, "embedded_table": table}
    (output_dir / "gpu_suite.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (output_dir / "gpu_suite.md").write_text(text)
    print(text)


if __name__ == "__main__":
    cli.run(main)
