"""Generate with any sampler: text (or a chat) with a checkpoint's tokenizer, or the main job.

With no flags, the main job: the small model that ships inside the package answers a held-out
arithmetic problem with static AR and the diffusion forcing sampler side by side (no download, no
network):

    python -m experiments.generate
    python -m experiments.generate --problem=98765+4321 --num_steps=64

Text with a checkpoint that has a tokenizer (converted or Hugging Face layout), streamed as it is
generated, with any sampler by the reference's option names:

    python -m experiments.generate --checkpoint=ckpt/huginn-0125 --prompt="The capital of France is"
    python -m experiments.generate --checkpoint=ckpt/huginn-0125 --chat --system="You are terse." \\
        --prompt="What is 7 x 8?" --sampler=diffusion --gen_kwargs="num_steps=32,inner_recurrence=4,exit_t=0.03"
    python -m experiments.generate --checkpoint=DIR --prompt_ids=1,2,3     # token ids in, token ids out

Many prompts at once (one per line; text, or comma-separated token ids), on a mesh of devices,
and across hosts (each process samples its share of the prompts; process 0 prints and writes):

    python -m experiments.generate --checkpoint=DIR --prompts_file=prompts.txt --output=out.jsonl --mesh=1,8
    python -m experiments.generate --checkpoint=DIR --prompt_ids_file=ids.txt --output=out.jsonl --mesh=2,4 \
        --distributed --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0   # on each host
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.common import define_device_flags, load_task_model, quiet_jax_logs, start_devices
from huginn_jax import cli, distributed
from huginn_jax.pretrained import load_model, load_model_and_tokenizer
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, MAX_DIGITS, Problem, demo_problem, reverse_digits, score
from samplers import GenerateOutput, SamplingConfig, generate, generate_diffusion_style, generate_minimal
from samplers.diffusion import PRESETS
from samplers.dispatch import SHORT_NAMES, parse_gen_kwargs, with_sampling
from samplers.text import TextStreamer, chat, complete, summary_line

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", str(EMBEDDED_MODEL),
                    "A converted (python -m convert) or Hugging Face layout checkpoint folder.")
flags.DEFINE_string("prompt", None, "Text to continue (or, with --chat, the user's message).")
flags.DEFINE_bool("chat", False, "Put --prompt into the checkpoint's chat template as the user's message.")
flags.DEFINE_string("system", None, "With --chat: a system message before the user's.")
flags.DEFINE_enum("sampler", "ar", sorted(SHORT_NAMES), "Sampler for text generation.")
flags.DEFINE_string("gen_kwargs", "", "Sampler options by the reference's names, lm-eval style: "
                    "'num_steps=32,inner_recurrence=4,exit_t=0.03' (also temperature, top_p, ...).")
flags.DEFINE_list("stop_strings", [], "Text generation ends once the generated text contains one of these.")
flags.DEFINE_string("problem", None, "An addition 'a+b' in ordinary notation, for the embedded arithmetic model "
                    "(default: a held-out problem with a long answer).")
flags.DEFINE_list("prompt_ids", None, "Prompt token ids (any checkpoint, tokens out).")
flags.DEFINE_string("prompts_file", None, "Text prompts, one per line, generated as one batch (with --chat, each line "
                    "is the user's message); needs a checkpoint with a tokenizer.")
flags.DEFINE_string("prompt_ids_file", None, "Prompts as comma-separated token ids, one per line, generated as one "
                    "batch (any checkpoint).")
flags.DEFINE_string("output", None, "With --prompts_file or --prompt_ids_file: also write one JSON line per prompt "
                    "(prompt, generated ids, text) to this file.")
define_device_flags()
flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate at most (default: 10 for arithmetic, 256 for text).")
flags.DEFINE_integer("num_steps", 32, "Recurrence steps per token (static AR; the diffusion prefill).")
flags.DEFINE_multi_enum("samplers", ["ar", "diffusion"], ["ar", "diffusion"],
                        "Samplers the arithmetic main job runs side by side.")
flags.DEFINE_enum("diffusion_preset", "paper-main", list(PRESETS), "Diffusion sampler setting of the main job.")
flags.DEFINE_float("init_scale", 1.0, "Scale of the random initial latent state (0: start from zeros).")
flags.DEFINE_bool("do_sample", False, "Sample instead of greedy decoding.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 50, "Top-k filter when sampling (0: off).")
flags.DEFINE_float("top_p", 1.0, "Top-p filter when sampling (1: off).")
flags.DEFINE_float("min_p", 0.0, "Min-p filter when sampling (0: off).")
flags.DEFINE_float("repetition_penalty", 1.0, "Repetition penalty (1: off).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default: the checkpoint's; float32 for "
                  "Hugging Face folders).")
flags.DEFINE_integer("repeats", 5, "Arithmetic main job: timed runs of each sampler (interleaved), median reported.")
flags.DEFINE_integer("seed", 0, "PRNG seed of the initial states and of sampling.")

MEANING = ("(sequential core steps set the speed on a GPU or TPU, where one step costs about the same for 1 or "
           "100 positions; on a CPU the total core position-steps do)")


def sampling_config() -> SamplingConfig:
    return SamplingConfig(do_sample=FLAGS.do_sample, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                          top_p=FLAGS.top_p, min_p=FLAGS.min_p, repetition_penalty=FLAGS.repetition_penalty)


def parse_problem(text: str) -> Problem:
    parts = text.replace(" ", "").split("+")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise cli.UsageError(f"--problem={text!r} is not an addition 'a+b' of two non-negative integers")
    a, b = (int(p) for p in parts)
    if max(len(parts[0].lstrip("0") or "0"), len(parts[1].lstrip("0") or "0")) > MAX_DIGITS:
        raise cli.UsageError(f"--problem={text!r}: the embedded model was trained on operands of at most "
                             f"{MAX_DIGITS} digits")
    return Problem(a, b)


def parse_prompt_ids(values: list[str]) -> list[int]:
    try:
        ids = [int(v) for v in values]
    except ValueError:
        raise cli.UsageError(f"--prompt_ids={','.join(values)!r} must be comma-separated integers") from None
    if not ids:
        raise cli.UsageError("--prompt_ids is empty")
    return ids


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def main(argv: list[str]) -> None:
    quiet_jax_logs()
    batch_files = [name for name in ("prompts_file", "prompt_ids_file") if FLAGS[name].value is not None]
    if len(batch_files) > 1 or (batch_files and (FLAGS.prompt is not None or FLAGS.prompt_ids or FLAGS.problem)):
        raise cli.UsageError(f"--{batch_files[0]} is one way to give prompts; it cannot be combined with "
                             "--prompt_ids_file, --prompt, --prompt_ids or --problem")
    if not batch_files and FLAGS.distributed:
        raise cli.UsageError("--distributed splits a batch of prompts across processes: pass --prompts_file or "
                             "--prompt_ids_file")
    if not batch_files and FLAGS.output:
        raise cli.UsageError("--output writes the results of --prompts_file or --prompt_ids_file")
    mesh = start_devices()
    if batch_files:
        return batch_job(mesh)
    if FLAGS.problem is not None and (FLAGS.prompt is not None or FLAGS.prompt_ids):
        raise cli.UsageError("--problem is for the embedded arithmetic model; it cannot be combined with --prompt "
                             "or --prompt_ids")
    if FLAGS.prompt is not None:
        return text_job(mesh)
    if FLAGS.chat:
        raise cli.UsageError("--chat needs --prompt (the user's message); for a conversation use experiments.chat")
    if FLAGS.prompt_ids is not None:
        return ids_job(parse_prompt_ids(FLAGS.prompt_ids), mesh)
    return arithmetic_job(mesh)


def sampler_options(mesh: Any) -> dict[str, Any]:
    """The sampler options of the flags: --gen_kwargs, the sampling flags, depth, init scale, key, mesh."""
    options = with_sampling(parse_gen_kwargs(FLAGS.gen_kwargs), sampling_config())
    options.setdefault("num_steps", FLAGS.num_steps)
    options.setdefault("init_scale", FLAGS.init_scale)
    options.setdefault("key", jax.random.key(FLAGS.seed))
    return {**options, "mesh": mesh}


def read_lines(flag: str) -> list[str]:
    path = Path(FLAGS[flag].value)
    try:
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as err:
        raise cli.UsageError(f"--{flag}={path}: cannot be read ({err.strerror})") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise cli.UsageError(f"--{flag}={path} holds no prompts (one per line)")
    return lines


def batch_job(mesh: Any) -> None:
    """Every prompt of a file as one batch; with --distributed, each process samples its share and
    process 0 prints (and writes) all of them, in the file's order."""
    texts = FLAGS.prompts_file is not None
    lines = read_lines("prompts_file" if texts else "prompt_ids_file")
    prompts: list[Any] = lines if texts else [parse_prompt_ids(line.split(",")) for line in lines]
    mine = distributed.share(len(prompts))
    max_new_tokens = FLAGS.max_new_tokens or (256 if texts else 10)
    options = sampler_options(mesh)
    result = None
    if texts:
        if FLAGS.system and not FLAGS.chat:
            raise cli.UsageError("--system needs --chat")
        config, params, tokenizer = load_model_and_tokenizer(FLAGS.checkpoint, FLAGS.dtype)
        if prompts[mine]:
            run = chat if FLAGS.chat else complete
            system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
            given = [system + [{"role": "user", "content": p}] for p in prompts[mine]] if FLAGS.chat else prompts[mine]
            out = run(params, tokenizer, given, config=config, max_new_tokens=max_new_tokens,
                      stop_strings=FLAGS.stop_strings, sampler=FLAGS.sampler, **options)
            result = (out.texts, out.output)
    else:
        if FLAGS.chat or FLAGS.system:
            raise cli.UsageError("--chat and --system take text prompts (--prompts_file)")
        config, params = load_model(FLAGS.checkpoint, FLAGS.dtype)
        if prompts[mine]:
            result = ([None] * len(prompts[mine]), generate(params, prompts[mine], config=config, sampler=FLAGS.sampler,
                                                            max_new_tokens=max_new_tokens, **options))
    shares = [share for share in distributed.gather(result) if share is not None]
    if not distributed.is_chief():
        return
    completions = [text for share in shares for text in share[0]]
    out = GenerateOutput.concatenate([share[1] for share in shares])
    records = []
    for i, (prompt, completion, ids) in enumerate(zip(prompts, completions, out.sequences())):
        print(f"[{i}] {prompt!r} -> {completion!r}" if texts else f"[{i}] {prompt} -> {ids}")
        records.append({"prompt": prompt, "generated_ids": ids, **({"completion": completion} if texts else {})})
    print(f"{len(prompts)} prompts, {int(out.lengths.sum())} tokens, sampler {FLAGS.sampler}"
          + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    if FLAGS.output:
        Path(FLAGS.output).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def text_job(mesh: Any) -> None:
    """Streams the continuation of --prompt (or the chat reply) and ends with one line of statistics."""
    if not FLAGS.prompt.strip():
        raise cli.UsageError("--prompt is empty")
    config, params, tokenizer = load_model_and_tokenizer(FLAGS.checkpoint, FLAGS.dtype)
    options = sampler_options(mesh)
    max_new_tokens = FLAGS.max_new_tokens or 256
    first_token: list[float] = []
    streamer = TextStreamer(tokenizer, stop_strings=FLAGS.stop_strings)

    def stream(new: list[np.ndarray]) -> None:
        if not first_token and len(new[0]):
            first_token.append(time.perf_counter())
        streamer(new)

    stream.end = streamer.end  # type: ignore[attr-defined]
    start = time.perf_counter()
    if FLAGS.chat:
        messages = ([{"role": "system", "content": FLAGS.system}] if FLAGS.system else []) + \
            [{"role": "user", "content": FLAGS.prompt}]
        out = chat(params, tokenizer, [messages], config=config, max_new_tokens=max_new_tokens,
                   stop_strings=FLAGS.stop_strings, sampler=FLAGS.sampler, streamer=stream, **options)
    else:
        if FLAGS.system:
            raise cli.UsageError("--system needs --chat")
        print(FLAGS.prompt, end="", flush=True)
        out = complete(params, tokenizer, [FLAGS.prompt], config=config, max_new_tokens=max_new_tokens,
                       stop_strings=FLAGS.stop_strings, sampler=FLAGS.sampler, streamer=stream, **options)
    end = time.perf_counter()
    print()
    print(summary_line(out.output, 0, end - start, end - first_token[0] if first_token else None))
    print(MEANING)


def ids_job(prompt: list[int], mesh: Any) -> None:
    """Token ids in, token ids out, for any checkpoint."""
    config, params = load_model(FLAGS.checkpoint, FLAGS.dtype)
    options = sampler_options(mesh)
    print(f"prompt ids: {prompt}")
    out, took = timed(lambda: generate(params, [prompt], config=config, sampler=FLAGS.sampler,
                                       max_new_tokens=FLAGS.max_new_tokens or 10, **options))
    print(f"{FLAGS.sampler}: {out.sequences()[0]}")
    print(summary_line(out, 0, took, None))


def arithmetic_job(mesh: Any) -> None:
    """The main job: the embedded (or another arithmetic) model answers a problem, samplers side by side."""
    if not (Path(FLAGS.checkpoint) / "tokenizer.json").exists():
        load_model(FLAGS.checkpoint)  # a clear error for a folder that is no checkpoint
        raise cli.UsageError(f"--checkpoint={FLAGS.checkpoint} has no tokenizer.json: pass --prompt_ids (or --prompt "
                             "for a checkpoint with a text tokenizer)")
    config, params, tokenizer = load_task_model(FLAGS.checkpoint, jnp.dtype(FLAGS.dtype or "float32"))
    problem = parse_problem(FLAGS.problem) if FLAGS.problem is not None else demo_problem()
    prompt = tokenizer.encode_prompt(problem)
    print(f"model: width {config.n_embd}, {config.n_layers_in_prelude}/{config.n_layers_in_recurrent_block}/"
          f"{config.n_layers_in_coda} layers (prelude/core/coda), trained at mean recurrence {config.mean_recurrence}")
    print(f"problem: {problem.a} + {problem.b} = ?   (the model reads and writes digits least-significant "
          f"first: prompt {problem.prompt!r})")
    print(f"prompt ids: {prompt}")
    common = dict(config=config, max_new_tokens=FLAGS.max_new_tokens or 10, num_steps=FLAGS.num_steps,
                  init_scale=FLAGS.init_scale, stop_token_ids=[tokenizer.end_id], key=jax.random.key(FLAGS.seed),
                  sampling=sampling_config(), mesh=mesh)
    samplers = {"ar": (f"static AR, r={FLAGS.num_steps}", lambda: generate_minimal(params, [prompt], **common)),
                "diffusion": (f"diffusion forcing, {FLAGS.diffusion_preset}", lambda: generate_diffusion_style(
                    params, [prompt], **common, **PRESETS[FLAGS.diffusion_preset]))}
    runs = dict(samplers[name] for name in samplers if name in FLAGS.samplers)
    outputs = {name: run() for name, run in runs.items()}  # compiles
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(FLAGS.repeats):
        for name, run in runs.items():
            out, took = timed(run)
            seconds[name].append(took)

    base = None
    for name, out in outputs.items():
        tokens = out.sequences()[0]
        took = statistics.median(seconds[name]) if seconds[name] else float("nan")
        speed = len(tokens) / took
        base = base or speed
        text = tokenizer.decode(tokens)
        digits = text.split("<")[0]
        verdict = "correct" if score(text, problem) else f"wrong (the answer is {problem.a + problem.b})"
        shown = f"{digits!r} = {reverse_digits(int(digits)) if digits.isdigit() else '?'}: {verdict}"
        sequential = float(out.stats["sequential_core_steps"][0]) / max(len(tokens), 1)
        total = float(out.stats["core_position_steps"][0]) / max(len(tokens), 1)
        memory = (f"{float(out.stats['cache_memory_mb'][0]):.3f} MiB filled of "
                  f"{float(out.stats['cache_allocated_mb'][0]):.3f} MiB allocated")
        print(f"{name:>32}: {shown}\n{'':>32}  {len(tokens)} tokens, {speed:.1f} tokens/s ({speed / base:.2f}x), "
              f"{sequential:.1f} sequential core steps per token, {total:.1f} core position-steps per token, "
              f"KV cache {memory}")
    print(f"({jax.devices()[0].platform}, batch 1, median of {FLAGS.repeats} runs after compilation)")
    print(MEANING)


if __name__ == "__main__":
    cli.run(main)
