"""The sampler table of an arithmetic-task model: every held-out problem decoded at batch size 1 by
each sampler in turn, with accuracy, tokens/s and what each sampler's steps did.

Shared by `experiments.evaluate_arithmetic` (the table in BENCHMARKS.md), `experiments.gpu_suite`
(the same table on a GPU) and `experiments.tpu_plan` (the rates of a trained model: adaptive depth
per token, tokens per speculative round, tokens per diffusion step and the wavefront, which random
weights cannot give).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
from tqdm import tqdm

from huginn_jax.config import HuginnConfig
from huginn_jax.tasks.arithmetic import Problem, TaskTokenizer, score
from samplers.adaptive_ar import generate_with_adaptive_compute
from samplers.common import PROMPT_BUCKET
from samplers.diffusion import PRESETS, generate_diffusion_style
from samplers.speculative import generate_speculative
from samplers.static_ar import generate_minimal

ROW_NAMES = ("ar", "adaptive", "diffusion-main", "diffusion-fast", "diffusion-fixed", "speculative")


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    sampler: Callable[..., Any]
    options: dict[str, Any]


def table_rows(num_steps: int) -> dict[str, Row]:
    """The paper's Table 1 settings (arXiv 2510.14961), each sampler with its default cache (adaptive
    AR with `latest-m4`, which its exits need), and the
    fixed-age freeze of its Algorithm 1 (r'=4, no noise, no momentum)."""
    return {
        "ar": Row(f"static AR r={num_steps}", generate_minimal, {}),
        # exits leave later tokens nothing to attend to at skipped steps under the `full` cache:
        # `latest-m4` reads each layer's latest entry instead (issue 14, point 7)
        "adaptive": Row("adaptive AR (latent-diff 0.03, latest-m4)", generate_with_adaptive_compute,
                        dict(criterion="latent-diff", exit_threshold=0.03, cache_lookup_strategy="latest-m4")),
        "diffusion-main": Row("diffusion, paper-main (r'=4, beta=0)", generate_diffusion_style,
                              dict(PRESETS["paper-main"])),
        "diffusion-fast": Row("diffusion, paper-fast (r'=2, beta=0.5)", generate_diffusion_style,
                              dict(PRESETS["paper-fast"])),
        "diffusion-fixed": Row("diffusion, fixed freeze (r'=4)", generate_diffusion_style,
                               dict(freeze_strategy="fixed", inner_recurrence=4, state_noise_mixing=0.0,
                                    ema_embeds=0.0, headway=1, max_wavefront=128)),
        "speculative": Row("self-speculative (4 draft steps x 4 tokens)", generate_speculative,
                           dict(draft_steps=4, lookahead_for_draft=4, verification_threshold=1.0)),
    }


def sampler_table(params: dict, config: HuginnConfig, tokenizer: TaskTokenizer, problems: Sequence[Problem],
                  rows: dict[str, Row], *, max_new_tokens: int, num_steps: int, seed: int,
                  progress: bool = True) -> list[dict]:
    """Every problem at batch 1 through every row in turn (interleaved, so a machine's noise hits
    all rows alike); the first problem of each prompt-length bucket is run once untimed first, so
    that no timing includes compilation.

    Per row: accuracy, tokens_per_second (end to end), mean_recurrence_per_token,
    core_position_steps_per_token (positions times recurrence steps: the diffusion sampler refines
    its whole wavefront), and the rates of its steps: `tokens_per_sampler_step` and
    `mean_wavefront` (diffusion), `tokens_per_round` (speculative).
    """
    common = dict(config=config, max_new_tokens=max_new_tokens, num_steps=num_steps,
                  stop_token_ids=[tokenizer.end_id])
    stats = {name: dict(seconds=0.0, tokens=0, core_steps=0, correct=0, position_steps=0, sampler_steps=0,
                        wavefront_positions=0, rounds=0) for name in rows}
    warmed: set[tuple[str, int]] = set()
    for index, problem in enumerate(tqdm(problems, desc="sampler table", unit="problem", disable=not progress)):
        prompt = [tokenizer.encode_prompt(problem)]
        key = jax.random.key(seed * 1_000_003 + index)
        for name, row in rows.items():
            run = lambda: row.sampler(params, prompt, key=key, **common, **row.options)  # noqa: E731
            bucket = (name, -(-len(prompt[0]) // PROMPT_BUCKET))  # prompts are padded to these buckets
            if bucket not in warmed:
                run()
                warmed.add(bucket)
            start = time.perf_counter()
            out = run()
            s = stats[name]
            s["seconds"] += time.perf_counter() - start
            s["tokens"] += int(out.lengths[0])
            s["core_steps"] += int(out.recurrence_steps[0].sum())
            s["correct"] += score(tokenizer.decode(out.sequences()[0]), problem)
            out_stats = getattr(out, "stats", {})
            forwarded = out_stats.get("num_tokens_forward")
            # the core's arithmetic: positions times steps (its statistic counts the prefill as one pass
            # over the prompt, which decodes the first token at num_steps, as AR does)
            s["position_steps"] += (int(forwarded[0]) - len(prompt[0]) + num_steps if forwarded is not None
                                    else int(out.recurrence_steps[0].sum()))
            if "diffusion_steps" in out_stats:  # num_tokens_forward adds r' x the wavefront at every step
                s["sampler_steps"] += int(out_stats["diffusion_steps"][0])
                s["wavefront_positions"] += (int(forwarded[0]) - len(prompt[0])) / row.options["inner_recurrence"]
            if "rounds" in out_stats:
                s["rounds"] += int(out_stats["rounds"][0])
    table = []
    for name, s in stats.items():
        record = {"row": name, "label": rows[name].label, "options": rows[name].options,
                  "accuracy": s["correct"] / len(problems), "tokens_per_second": s["tokens"] / s["seconds"],
                  "mean_recurrence_per_token": s["core_steps"] / s["tokens"],
                  "core_position_steps_per_token": s["position_steps"] / s["tokens"], "tokens": s["tokens"],
                  "seconds": s["seconds"], "problems": len(problems)}
        if s["sampler_steps"]:
            # the prefill yields the first token of every problem; the sampler steps the rest
            record["tokens_per_sampler_step"] = (s["tokens"] - len(problems)) / s["sampler_steps"]
            record["mean_wavefront"] = s["wavefront_positions"] / s["sampler_steps"]
        if s["rounds"]:
            record["tokens_per_round"] = (s["tokens"] - len(problems)) / s["rounds"]  # the first from the prefill
        table.append(record)
    if "ar" in stats:
        base = next(t for t in table if t["row"] == "ar")
        for t in table:
            t["speedup_vs_ar"] = t["tokens_per_second"] / base["tokens_per_second"]
            t["accuracy_vs_ar_points"] = 100 * (t["accuracy"] - base["accuracy"])
    return table
