"""Tokens per second of each sampler on a model with random weights.

Every measurement runs after warm-up (compilation) and reports the median of `--repeats` timed
calls of the sampler, end to end (prefill included), as one JSON object per line. Ratios are
measured side by side in one run: every sampler against static AR, and, with `--reference_dir`,
huginn-jax against the official PyTorch implementation on the same weights, prompt and options.

    python -m experiments.benchmark --profile=cpu
    python -m experiments.benchmark --profile=cpu --samplers=ar,adaptive --cache_lookup_strategy=full,skip,...
    python -m experiments.benchmark --profile=huginn-0125 --cache_table --cache_lookup_strategy=full,...
    python -m experiments.benchmark --profile=cpu --samplers=ar,adaptive,diffusion --reference_dir=.../recpre
    python -m experiments.benchmark --profile=cpu --samplers=diffusion --batch=1,4,16
    python -m experiments.benchmark --profile=cpu --samplers=ar,speculative --draft_steps=4 --lookahead_for_draft=4
    python -m experiments.benchmark --profile=huginn-0125 --samplers=ar,diffusion --diffusion_preset=paper-main
    python -m experiments.benchmark --profile=huginn-0125 --batch=32 --mesh=2,4      # 8 devices: data 2 x model 4
    python -m experiments.benchmark ... --distributed --coordinator_address=HOST:PORT --num_processes=N --process_id=I

With --mesh the sampler runs on a device mesh (`huginn_jax.sharding`); with --distributed every
process times its share of each batch on its own devices, and process 0 reports the whole batch
(tokens/s over the slowest process's time).

Random weights do not converge, so on them the latent freeze rules decide little: the default
diffusion setting freezes at a fixed age (`--freeze_strategy=fixed`, r'=4, no noise, no momentum,
shared cache), which measures the sampler's parallelism. Nor do their shallow drafts agree with
the deep pass, so self-speculative decoding accepts few drafts on them: it needs a trained model.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments.common import define_device_flags, pyplot, quiet_jax_logs, start_devices
from huginn_jax import cli, distributed, sharding
from huginn_jax.config import CPU_BENCHMARK, HUGINN_0125, TINY, HuginnConfig
from huginn_jax.kv_cache import CacheStrategy, cache_bytes_per_token, entry_bytes
from huginn_jax.params import init_params
from samplers import (GenerateOutput, generate_diffusion_style, generate_minimal, generate_speculative,
                      generate_with_adaptive_compute)
from samplers.benchmark_profile import BenchmarkProfile
from samplers.diffusion import PRESETS as DIFFUSION_PRESETS


PROFILES = {
    "cpu": BenchmarkProfile(CPU_BENCHMARK, jnp.float32, prompt_tokens=32, new_tokens=64, num_steps=32),
    "huginn-0125": BenchmarkProfile(HUGINN_0125, jnp.bfloat16, prompt_tokens=32, new_tokens=64, num_steps=32),
    "tiny": BenchmarkProfile(TINY, jnp.float32, prompt_tokens=12, new_tokens=24, num_steps=8),
}

SAMPLERS: dict[str, Callable[..., Any]] = {
    "ar": generate_minimal, "adaptive": generate_with_adaptive_compute, "speculative": generate_speculative,
    "diffusion": generate_diffusion_style}
REFERENCE_METHODS = {"ar": "generate_minimal", "adaptive": "generate_with_adaptive_compute",
                     "speculative": "generate_speculative", "diffusion": "generate_diffusion_style"}

FLAGS = flags.FLAGS
flags.DEFINE_enum("profile", "cpu", list(PROFILES), "Model shape, dtype, prompt and generation lengths.")
flags.DEFINE_string("config_json", None, "An HF config.json to use instead of the profile's model shape.")
flags.DEFINE_list("samplers", ["ar"], f"Samplers to time: {sorted(SAMPLERS)}.")
flags.DEFINE_list("batch", ["1"], "Batch sizes.")
flags.DEFINE_list("new_tokens", [], "New tokens per sequence (default: the profile's).")
flags.DEFINE_integer("num_steps", None, "Recurrence steps per token (default: the profile's).")
flags.DEFINE_list("cache_lookup_strategy", ["full"], "KV cache strategies of the AR samplers.")
flags.DEFINE_string("criterion", "latent-diff", "Exit criterion of the adaptive sampler.")
flags.DEFINE_float("exit_threshold", 0.03, "Exit threshold of the adaptive sampler.")
flags.DEFINE_integer("draft_steps", 4, "Recurrence steps of a speculative draft (the paper's tuned 4).")
flags.DEFINE_integer("lookahead_for_draft", 4, "Tokens drafted per speculative round (the paper's tuned 4).")
flags.DEFINE_float("verification_threshold", 1.0, "Speculative acceptance: >= 1 exact argmax match.")
flags.DEFINE_enum("diffusion_preset", None, list(DIFFUSION_PRESETS), "A named diffusion setting (overrides "
                  "the diffusion flags below).")
flags.DEFINE_string("freeze_strategy", "fixed", "Diffusion freeze rule.")
flags.DEFINE_integer("inner_recurrence", 4, "Diffusion core steps per sampler step.")
flags.DEFINE_float("state_noise_mixing", 0.0, "Diffusion noise mixing.")
flags.DEFINE_float("ema_embeds", 0.0, "Diffusion embedding momentum.")
flags.DEFINE_float("exit_t", 0.03, "Diffusion latent freeze threshold.")
flags.DEFINE_integer("max_wavefront", 128, "Diffusion wavefront limit.")
flags.DEFINE_string("diffusion_cache", "latest-m4-compress-s4", "KV cache strategy of the diffusion sampler.")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement; the median is reported.")
flags.DEFINE_integer("warmup", 1, "Untimed calls before timing (the first one compiles).")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.")
flags.DEFINE_string("reference_dir", None, "Folder with the official raven_modeling_minimal.py: also time it.")
flags.DEFINE_integer("reference_repeats", 2, "Timed calls of the reference per measurement.")
flags.DEFINE_string("output", None, "Also append the JSON lines to this file.")
flags.DEFINE_string("plot", None, "Write a bar chart of tokens/s to this PNG file (needs matplotlib).")
flags.DEFINE_bool("cache_table", False, "Print a Markdown table of the KV cache's bytes per token and for "
                  "--cache_table_tokens tokens under each --cache_lookup_strategy, for the profile's model, dtype and "
                  "num_steps (computed from the config; nothing runs), and exit.")
flags.DEFINE_integer("cache_table_tokens", 4096, "Text length of the --cache_table column.")
define_device_flags()


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, Any]:
    """(median seconds of `repeats` calls after `warmup` calls, the last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
        logging.info("  repeat %d/%d: %.3f s", i + 1, repeats, seconds[-1])
    return statistics.median(seconds), result


def emit(record: dict) -> None:
    if not distributed.is_chief():
        return
    line = json.dumps(record)
    print(line, flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def sampler_options(sampler: str, num_steps: int) -> list[dict[str, Any]]:
    """The option sets to time for a sampler (one per cache strategy for the AR samplers)."""
    if sampler == "diffusion":
        options = DIFFUSION_PRESETS[FLAGS.diffusion_preset] if FLAGS.diffusion_preset else dict(
            freeze_strategy=FLAGS.freeze_strategy, inner_recurrence=FLAGS.inner_recurrence,
            state_noise_mixing=FLAGS.state_noise_mixing, ema_embeds=FLAGS.ema_embeds, exit_t=FLAGS.exit_t,
            max_wavefront=FLAGS.max_wavefront, headway=1)
        return [dict(options, num_steps=num_steps, cache_lookup_strategy=FLAGS.diffusion_cache)]
    extra = {"ar": {}, "adaptive": dict(criterion=FLAGS.criterion, exit_threshold=FLAGS.exit_threshold),
             "speculative": dict(draft_steps=FLAGS.draft_steps, lookahead_for_draft=FLAGS.lookahead_for_draft,
                                 verification_threshold=FLAGS.verification_threshold)}[sampler]
    return [dict(num_steps=num_steps, cache_lookup_strategy=s, **extra) for s in FLAGS.cache_lookup_strategy]


def reference_run(model: Any, sampler: str, prompt: np.ndarray, new_tokens: int,
                  options: dict) -> tuple[float, np.ndarray]:
    """Median seconds of the reference's sampler and its first `new_tokens` new tokens."""
    import torch
    from transformers import GenerationConfig

    ids = torch.from_numpy(prompt.astype(np.int64))
    generation_config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens)
    method = getattr(model, REFERENCE_METHODS[sampler])

    def run() -> np.ndarray:
        with torch.no_grad():
            out = method(ids, generation_config, max_new_tokens=new_tokens, init_scale=0.0, **options)
        return out[:, prompt.shape[1]: prompt.shape[1] + new_tokens].numpy()

    return timed(run, warmup=0, repeats=FLAGS.reference_repeats)


def leading_agreement(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    return int((np.asarray(a[:n]) == np.asarray(b[:n])).cumprod().sum())


def plot(records: list[dict], path: str) -> None:
    try:
        plt = pyplot()
    except ImportError:
        raise app.UsageError("--plot needs matplotlib: pip install 'huginn-jax[plots]'") from None
    rows = [r for r in records if "tokens_per_s" in r]
    short = {"full": "full cache", "latest-m4": "latest-m4", "latest-m4-compress-s4": "shared cache"}
    labels = [f"{r['implementation'].split()[0]}\n{r['sampler']} b{r['batch']}\n"
              f"{short.get(r['cache_lookup_strategy'], r['cache_lookup_strategy'])}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    colors = ["tab:blue" if r["implementation"] == "huginn-jax" else "tab:gray" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("tokens / s (aggregate)")
    ax.set_title(f"profile {rows[0]['profile']}, {rows[0]['new_tokens']} new tokens, r={rows[0]['num_steps']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cache_table(config: HuginnConfig, strategies: list[str], num_steps: int, dtype: Any, tokens: int) -> str:
    """Markdown: each strategy's cache bytes per token and for `tokens` tokens at static depth
    `num_steps` (every slot of every position filled; `kv_cache.cache_bytes_per_token`)."""
    full = cache_bytes_per_token(config, "full", num_steps, dtype)
    lines = [f"| cache_lookup_strategy | slots per token | MB per token | GB for {tokens} tokens | vs full |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in strategies:
        per_token = cache_bytes_per_token(config, CacheStrategy.parse(name, config.n_layers_in_recurrent_block),
                                          num_steps, dtype)
        slots = per_token // entry_bytes(config, dtype)  # layer applications stored per token
        lines.append(f"| `{name}` | {slots} | {per_token / 1e6:.3f} | {per_token * tokens / 1e9:.2f} | "
                     f"{per_token / full:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    quiet_jax_logs()
    if FLAGS.cache_table:
        profile = PROFILES[FLAGS.profile]
        config = HuginnConfig.from_hf_json(FLAGS.config_json) if FLAGS.config_json else profile.config
        try:
            print(cache_table(config, FLAGS.cache_lookup_strategy, FLAGS.num_steps or profile.num_steps,
                              profile.dtype, FLAGS.cache_table_tokens))
        except ValueError as err:
            raise cli.UsageError(f"--cache_lookup_strategy: {err}") from None
        return
    mesh = start_devices()
    profile = PROFILES[FLAGS.profile]
    config = HuginnConfig.from_hf_json(FLAGS.config_json) if FLAGS.config_json else profile.config
    num_steps = FLAGS.num_steps or profile.num_steps
    new_token_counts = [int(n) for n in FLAGS.new_tokens] or [profile.new_tokens]
    unknown = set(FLAGS.samplers) - set(SAMPLERS)
    if unknown:
        raise app.UsageError(f"unknown samplers {sorted(unknown)}; choose from {sorted(SAMPLERS)}")

    logging.info("initialising %s parameters (%s)", FLAGS.profile, jnp.dtype(profile.dtype).name)
    params = init_params(config, jax.random.key(FLAGS.seed), profile.dtype)
    reference = None
    if FLAGS.reference_dir and distributed.is_chief():
        from experiments.reference_model import reference_model

        reference = reference_model(FLAGS.reference_dir, config, params)
    rng = np.random.default_rng(FLAGS.seed)
    if mesh is not None:  # placed once: every call then finds the parameters in place
        config, params = sharding.shard_params(params, config, mesh)
    device = f"{jax.devices()[0].device_kind} ({platform.machine()}, {jax.device_count()} device(s))"
    if mesh is not None or jax.process_count() > 1:
        device += (f", mesh {dict(mesh.shape)}" if mesh is not None else "") + \
            (f", {jax.process_count()} processes" if jax.process_count() > 1 else "")
    prompts = {b: rng.integers(0, config.vocab_size, (b, profile.prompt_tokens), dtype=np.int32)
               for b in (int(b) for b in FLAGS.batch)}

    records = []
    for batch, prompt in prompts.items():
        for new_tokens in new_token_counts:
            baselines = []
            for sampler in FLAGS.samplers:
                for options in sampler_options(sampler, num_steps):
                    logging.info("%s: batch %d, %d new tokens, %s", sampler, batch, new_tokens, options)
                    rows = prompt[distributed.share(batch)]  # all of it, but in a multi-process run
                    seconds, out = timed(
                        lambda: SAMPLERS[sampler](params, rows, config=config, max_new_tokens=new_tokens,
                                                  init_scale=0.0, stop_token_ids=(), key=jax.random.key(FLAGS.seed),
                                                  mesh=mesh, **options),
                        FLAGS.warmup, FLAGS.repeats) if len(rows) else (0.0, None)
                    shares = distributed.gather((seconds, out))
                    seconds = max(s for s, _ in shares)
                    out = GenerateOutput.concatenate([o for _, o in shares])
                    record = dict(sampler=sampler, implementation="huginn-jax", profile=FLAGS.profile, batch=batch,
                                  prompt_tokens=profile.prompt_tokens, new_tokens=new_tokens,
                                  seconds=round(seconds, 4), tokens_per_s=round(batch * new_tokens / seconds, 3),
                                  dtype=jnp.dtype(profile.dtype).name, init_scale=0.0, device=device, **options)
                    record["mean_recurrence"] = round(float(out.recurrence_steps[out.tokens >= 0].mean()), 2)
                    stats = getattr(out, "stats", {})
                    for name in ("cache_memory_mb", "cache_allocated_mb"):  # per sequence, averaged over the batch
                        if name in stats:
                            record[name] = round(float(np.mean(stats[name])), 4)
                    if "diffusion_steps" in stats:
                        record["diffusion_steps"] = int(np.asarray(stats["diffusion_steps"]).max())
                    if "accepted_per_round" in stats:
                        accepted = [a for row in stats["accepted_per_round"] for a in row]
                        record["mean_accepted_per_round"] = round(float(np.mean(accepted)), 2)
                        record["rounds"] = int(np.asarray(stats["rounds"]).max())
                    emit(record)
                    records.append(record)
                    if sampler == "ar":
                        baselines.append(record)
                    for baseline in baselines if sampler != "ar" else []:
                        emit(dict(comparison=f"{sampler} / ar tokens_per_s (huginn-jax, same run)", batch=batch,
                                  new_tokens=new_tokens, ar_cache=baseline["cache_lookup_strategy"],
                                  cache_lookup_strategy=options["cache_lookup_strategy"],
                                  ratio=round(baseline["seconds"] / seconds, 2)))
                    if reference is not None and batch == 1:
                        logging.info("reference %s: %d new tokens, %s", REFERENCE_METHODS[sampler], new_tokens,
                                     options)
                        ref_seconds, ref_tokens = reference_run(reference, sampler, prompt, new_tokens, options)
                        measured = ("mean_recurrence", "diffusion_steps", "mean_accepted_per_round", "rounds")
                        ref_record = {k: v for k, v in record.items() if k not in measured}
                        ref_record.update(implementation="reference (PyTorch)", seconds=round(ref_seconds, 4),
                                          tokens_per_s=round(new_tokens / ref_seconds, 3))
                        emit(ref_record)
                        records.append(ref_record)
                        emit(dict(comparison="huginn-jax / reference tokens_per_s", sampler=sampler,
                                  new_tokens=new_tokens, cache_lookup_strategy=options["cache_lookup_strategy"],
                                  ratio=round(ref_seconds / seconds, 2),
                                  identical_leading_tokens=f"{leading_agreement(ref_tokens[0], out.tokens[0])}"
                                                           f"/{new_tokens}"))
    if FLAGS.plot and distributed.is_chief():
        plot(records, FLAGS.plot)


if __name__ == "__main__":
    cli.run(main)
