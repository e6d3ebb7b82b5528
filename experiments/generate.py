"""The main job: answers an arithmetic problem with the embedded trained model, static AR and the
diffusion forcing sampler side by side, with their tokens per second.

With no flags it runs the small model that ships inside the package (no download, no network):

    python -m experiments.generate
    python -m experiments.generate --problem=98765+4321 --num_steps=64
    python -m experiments.generate --checkpoint=/path/to/hf_or_converted --prompt_ids=1,2,3 --max_new_tokens=24

A checkpoint folder with a `tokenizer.json` of the arithmetic task takes `--problem`; any other
checkpoint takes `--prompt_ids` and prints token ids.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import load_checkpoint, load_task_model, quiet_jax_logs
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, Problem, demo_problem, reverse_digits, score
from samplers import SamplingConfig, generate_diffusion_style, generate_minimal
from samplers.diffusion import PRESETS

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", str(EMBEDDED_MODEL),
                    "A converted (python -m convert) or Hugging Face layout checkpoint folder.")
flags.DEFINE_string("problem", None, "An addition 'a+b' in ordinary notation (default: a held-out problem with a long answer).")
flags.DEFINE_list("prompt_ids", None, "Prompt token ids, for checkpoints without the task's tokenizer.json.")
flags.DEFINE_integer("max_new_tokens", 10, "Tokens to generate at most.")
flags.DEFINE_integer("num_steps", 32, "Recurrence steps per token of static AR (and the diffusion prefill).")
flags.DEFINE_multi_enum("samplers", ["ar", "diffusion"], ["ar", "diffusion"], "Samplers to run side by side.")
flags.DEFINE_enum("diffusion_preset", "paper-main", list(PRESETS), "Diffusion sampler setting (the paper's).")
flags.DEFINE_float("init_scale", 1.0, "Scale of the random initial latent state (0: start from zeros).")
flags.DEFINE_bool("do_sample", False, "Sample instead of greedy decoding.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 50, "Top-k filter when sampling (0: off).")
flags.DEFINE_float("top_p", 1.0, "Top-p filter when sampling (1: off).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("repeats", 5, "Timed runs of each sampler (interleaved); the median is reported.")
flags.DEFINE_integer("seed", 0, "PRNG seed of the initial states and of sampling.")


def parse_problem(text: str) -> Problem:
    try:
        a, b = (int(x) for x in text.replace(" ", "").split("+"))
    except ValueError:
        raise app.UsageError(f"--problem={text!r} is not an addition 'a+b' of two non-negative integers") from None
    if a < 0 or b < 0:
        raise app.UsageError(f"--problem={text!r}: operands must be non-negative")
    return Problem(a, b)


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    quiet_jax_logs()
    dtype = jnp.dtype(FLAGS.dtype)
    has_tokenizer = (Path(FLAGS.checkpoint) / "tokenizer.json").exists() and FLAGS.prompt_ids is None
    if has_tokenizer:
        config, params, tokenizer = load_task_model(FLAGS.checkpoint, dtype)
        problem = parse_problem(FLAGS.problem) if FLAGS.problem else demo_problem()
        prompt = tokenizer.encode_prompt(problem)
        stops = [tokenizer.end_id]
    else:
        if FLAGS.problem:
            raise app.UsageError(f"{FLAGS.checkpoint} has no tokenizer.json of the arithmetic task: pass --prompt_ids")
        if not FLAGS.prompt_ids:
            raise app.UsageError(f"{FLAGS.checkpoint} has no tokenizer.json: pass --prompt_ids")
        config, params = load_checkpoint(FLAGS.checkpoint, dtype)
        tokenizer, problem, prompt, stops = None, None, [int(t) for t in FLAGS.prompt_ids], None

    print(f"model: width {config.n_embd}, {config.n_layers_in_prelude}/{config.n_layers_in_recurrent_block}/"
          f"{config.n_layers_in_coda} layers (prelude/core/coda), trained at mean recurrence {config.mean_recurrence}")
    if problem is not None:
        print(f"problem: {problem.a} + {problem.b} = ?   (the model reads and writes digits least-significant "
              f"first: prompt {problem.prompt!r})")
    print(f"prompt ids: {prompt}")
    common = dict(config=config, max_new_tokens=FLAGS.max_new_tokens, num_steps=FLAGS.num_steps,
                  init_scale=FLAGS.init_scale, stop_token_ids=stops, key=jax.random.key(FLAGS.seed),
                  sampling=SamplingConfig(do_sample=FLAGS.do_sample, temperature=FLAGS.temperature,
                                          top_k=FLAGS.top_k, top_p=FLAGS.top_p))
    samplers = {"ar": (f"static AR, r={FLAGS.num_steps}", lambda: generate_minimal(params, [prompt], **common)),
                "diffusion": (f"diffusion forcing, {FLAGS.diffusion_preset}", lambda: generate_diffusion_style(
                    params, [prompt], **common, **PRESETS[FLAGS.diffusion_preset]))}
    runs = dict(samplers[name] for name in samplers if name in FLAGS.samplers)
    outputs = {name: run() for name, run in runs.items()}  # compiles
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(FLAGS.repeats):
        for name, run in runs.items():
            out, took = timed(run)
            assert out.sequences() == outputs[name].sequences() or FLAGS.do_sample
            seconds[name].append(took)

    base = None
    for name, out in outputs.items():
        tokens = out.sequences()[0]
        speed = len(tokens) / statistics.median(seconds[name])
        base = base or speed
        steps = float(np.sum(out.recurrence_steps[0])) / max(len(tokens), 1)
        if tokenizer is not None:
            text = tokenizer.decode(tokens)
            digits = text.split("<")[0]
            verdict = "correct" if score(text, problem) else f"wrong (the answer is {problem.a + problem.b})"
            shown = f"{digits!r} = {reverse_digits(int(digits)) if digits.isdigit() else '?'}: {verdict}"
        else:
            shown = f"{tokens}"
        print(f"{name:>32}: {shown}\n{'':>32}  {len(tokens)} tokens, {speed:.1f} tokens/s ({speed / base:.2f}x), "
              f"{steps:.1f} core steps per token")
    print(f"({jax.devices()[0].platform}, batch 1, median of {FLAGS.repeats} runs after compilation)")


if __name__ == "__main__":
    app.run(main)
