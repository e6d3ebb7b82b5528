"""Tokens per second of each sampler on a model with random weights.

Every measurement runs after warm-up (compilation) and reports the median of `--repeats` timed
calls of the sampler, end to end (prefill included), as one JSON object per line. With
`--reference_dir` it also times the official PyTorch implementation on the same weights, prompt
and options in the same process, and prints the ratio: compare implementations only side by side.

    python -m experiments.benchmark --profile=cpu
    python -m experiments.benchmark --profile=cpu --new_tokens=64,512
    python -m experiments.benchmark --profile=cpu --reference_dir=/path/to/recurrent-pretraining/recpre
    python -m experiments.benchmark --profile=huginn-0125 --batch=1,4      # on a GPU
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments.common import quiet_jax_logs
from huginn_jax.config import CPU_BENCHMARK, HUGINN_0125, TINY, HuginnConfig
from huginn_jax.params import init_params
from samplers import generate_minimal


@dataclasses.dataclass(frozen=True)
class Profile:
    config: HuginnConfig
    dtype: Any
    prompt_tokens: int
    new_tokens: int
    num_steps: int


PROFILES = {
    "cpu": Profile(CPU_BENCHMARK, jnp.float32, prompt_tokens=32, new_tokens=64, num_steps=32),
    "huginn-0125": Profile(HUGINN_0125, jnp.bfloat16, prompt_tokens=32, new_tokens=64, num_steps=32),
    "tiny": Profile(TINY, jnp.float32, prompt_tokens=12, new_tokens=24, num_steps=8),
}

SAMPLERS: dict[str, Callable[..., Any]] = {"ar": generate_minimal}

FLAGS = flags.FLAGS
flags.DEFINE_enum("profile", "cpu", list(PROFILES), "Model shape, dtype, prompt and generation lengths.")
flags.DEFINE_string("config_json", None, "An HF config.json to use instead of the profile's model shape.")
flags.DEFINE_list("samplers", ["ar"], f"Samplers to time: {sorted(SAMPLERS)}.")
flags.DEFINE_list("batch", ["1"], "Batch sizes.")
flags.DEFINE_list("new_tokens", [], "New tokens per sequence (default: the profile's).")
flags.DEFINE_integer("num_steps", None, "Recurrence steps per token (default: the profile's).")
flags.DEFINE_list("cache_lookup_strategy", ["full"], "KV cache strategies to time.")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement; the median is reported.")
flags.DEFINE_integer("warmup", 1, "Untimed calls before timing (the first one compiles).")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.")
flags.DEFINE_string("reference_dir", None, "Folder with the official raven_modeling_minimal.py: also time it.")
flags.DEFINE_integer("reference_repeats", 2, "Timed calls of the reference per measurement.")
flags.DEFINE_string("output", None, "Also append the JSON lines to this file.")


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
    line = json.dumps(record)
    print(line, flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def reference_seconds(model: Any, prompt: np.ndarray, new_tokens: int, options: dict) -> tuple[float, np.ndarray]:
    """Median seconds of the reference's generate_minimal and its new tokens."""
    import torch
    from transformers import GenerationConfig

    ids = torch.from_numpy(prompt.astype(np.int64))
    generation_config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens)

    def run() -> np.ndarray:
        with torch.no_grad():
            out = model.generate(ids, generation_config, max_new_tokens=new_tokens, continuous_compute=False,
                                 init_scale=0.0, **options)
        return out[:, prompt.shape[1]:].numpy()

    return timed(run, warmup=0, repeats=FLAGS.reference_repeats)


def main(argv: list[str]) -> None:
    del argv
    quiet_jax_logs()
    profile = PROFILES[FLAGS.profile]
    config = HuginnConfig.from_hf_json(FLAGS.config_json) if FLAGS.config_json else profile.config
    num_steps = FLAGS.num_steps or profile.num_steps
    new_token_counts = [int(n) for n in FLAGS.new_tokens] or [profile.new_tokens]
    unknown = set(FLAGS.samplers) - set(SAMPLERS)
    if unknown:
        raise app.UsageError(f"unknown samplers {sorted(unknown)}; choose from {sorted(SAMPLERS)}")

    logging.info("initialising %s parameters (%s)", FLAGS.profile, jnp.dtype(profile.dtype).name)
    params = init_params(config, jax.random.key(FLAGS.seed), profile.dtype)
    rng = np.random.default_rng(FLAGS.seed)
    reference = None
    if FLAGS.reference_dir:
        from experiments.reference_model import reference_model

        reference = reference_model(FLAGS.reference_dir, config, params)
    device = f"{jax.devices()[0].device_kind} ({platform.machine()}, {jax.device_count()} device(s))"

    for sampler in FLAGS.samplers:
        for strategy in FLAGS.cache_lookup_strategy:
            for batch in (int(b) for b in FLAGS.batch):
                for new_tokens in new_token_counts:
                    prompt = rng.integers(0, config.vocab_size, (batch, profile.prompt_tokens), dtype=np.int32)
                    options = dict(num_steps=num_steps, cache_lookup_strategy=strategy)
                    logging.info("%s: batch %d, %d new tokens, %s", sampler, batch, new_tokens, options)
                    seconds, out = timed(
                        lambda: SAMPLERS[sampler](params, prompt, config=config, max_new_tokens=new_tokens,
                                                  init_scale=0.0, stop_token_ids=(), **options),
                        FLAGS.warmup, FLAGS.repeats)
                    record = dict(sampler=sampler, implementation="huginn-jax", profile=FLAGS.profile,
                                  batch=batch, prompt_tokens=profile.prompt_tokens, new_tokens=new_tokens,
                                  seconds=round(seconds, 4), tokens_per_s=round(batch * new_tokens / seconds, 3),
                                  dtype=jnp.dtype(profile.dtype).name, init_scale=0.0, device=device, **options)
                    emit(record)
                    if reference is not None and sampler == "ar" and batch == 1:
                        logging.info("reference generate_minimal: %d new tokens, %s", new_tokens, options)
                        ref_seconds, ref_tokens = reference_seconds(reference, prompt, new_tokens, options)
                        agree = int((ref_tokens[0] == out.tokens[0]).cumprod().sum())
                        emit(dict(record, implementation="reference (PyTorch)", seconds=round(ref_seconds, 4),
                                  tokens_per_s=round(new_tokens / ref_seconds, 3)))
                        emit(dict(comparison="huginn-jax / reference tokens_per_s", sampler=sampler,
                                  new_tokens=new_tokens, cache_lookup_strategy=strategy,
                                  ratio=round(ref_seconds / seconds, 2),
                                  identical_leading_tokens=f"{agree}/{new_tokens}"))


if __name__ == "__main__":
    app.run(main)
