"""Per-sample records, per-run summaries and the paper's Table 1 layout (pure functions).

A record is one JSON line of the evaluate CLI's output: the task's score of one completion plus
the generation's statistics. A summary aggregates the records of one (sampler, task) run. The
table puts summaries side by side like Table 1 of the paper: one row per sampler, one column per
task, each cell "accuracy / tokens per second", then the accuracy difference (points) and the
speedup of every other sampler against the reference row (static AR at r=32).

Tokens per second: a sample's generated tokens (up to and including the stop) over its wall
time. `median` is the median over samples, the paper's measure, meaningful at batch size 1;
`aggregate` is all generated tokens over the run's wall time, the throughput at the batch size
used. Every table says which one it shows.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Literal, Mapping, Sequence

from huginn_jax.tasks.base import Doc, Task

RECORD_FIELDS = ("doc_id", "prompt", "prompt_ids", "completion", "extracted", "gold", "correct",
                 "new_tokens", "seconds", "core_steps", "sequential_core_steps")
Throughput = Literal["median", "aggregate"]


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    new_tokens: int  # generated tokens up to and including the stop token
    seconds: float  # wall time of the sample's generation (of its batch, at batch size > 1)
    core_steps: int  # recurrent-core applications summed over the generated positions
    sequential_core_steps: int  # core applications one after another (the latency path)


def sample_record(task: Task, doc: Doc, prompt: str, prompt_ids: Sequence[int], completion: str,
                  score: Mapping[str, Any], stats: GenerationStats, **extra: Any) -> dict[str, Any]:
    """The JSONL record of one sample: RECORD_FIELDS in that order, then `task`, the per-metric
    results (`metrics`), the sandbox outcome of code tasks, and any `extra` (e.g. sampler)."""
    record = {"doc_id": task.doc_id(doc), "prompt": prompt, "prompt_ids": [int(i) for i in prompt_ids],
              "completion": completion, "extracted": score["extracted"], "gold": score["gold"],
              "correct": bool(score["correct"]), "new_tokens": int(stats.new_tokens),
              "seconds": float(stats.seconds), "core_steps": int(stats.core_steps),
              "sequential_core_steps": int(stats.sequential_core_steps), "task": task.name,
              "metrics": {k: bool(v) for k, v in score["metrics"].items()}}
    record.update({k: score[k] for k in ("extracted_strict", "status", "stderr_tail") if k in score})
    record.update(extra)
    return record


def summarize(records: Sequence[Mapping[str, Any]], batch_size: int = 1,
              wall_seconds: float | None = None) -> dict[str, Any]:
    """Accuracy (primary and per metric, fractions), token counts, throughput and core steps of
    one run. `wall_seconds` is the whole run's wall time (for the aggregate throughput)."""
    if not records:
        raise ValueError("no records to summarize")
    tokens = sum(r["new_tokens"] for r in records)
    rates = [r["new_tokens"] / r["seconds"] for r in records if r["seconds"] > 0]
    metric_names = list(records[0].get("metrics", {}))
    return {
        "num_samples": len(records),
        "accuracy": sum(bool(r["correct"]) for r in records) / len(records),
        "metrics": {m: sum(bool(r["metrics"][m]) for r in records) / len(records) for m in metric_names},
        "batch_size": batch_size,
        "total_new_tokens": tokens,
        "mean_new_tokens": tokens / len(records),
        "median_tokens_per_second": statistics.median(rates) if rates else None,
        "aggregate_tokens_per_second": tokens / wall_seconds if wall_seconds else None,
        "wall_seconds": wall_seconds,
        "core_steps_per_token": sum(r["core_steps"] for r in records) / tokens if tokens else None,
        "sequential_core_steps_per_token":
            sum(r["sequential_core_steps"] for r in records) / tokens if tokens else None,
    }


def throughput_caption(throughput: Throughput, batch_sizes: Sequence[int]) -> str:
    sizes = ", ".join(str(b) for b in sorted(set(batch_sizes)))
    plural = "s" if len(set(batch_sizes)) > 1 else ""
    if throughput == "median":
        paper = " (the paper's measure)" if set(batch_sizes) == {1} else " (the paper measures at batch size 1)"
        return f"tokens per second: median over samples at batch size{plural} {sizes}{paper}"
    return f"tokens per second: aggregate throughput (all generated tokens / wall time) at batch size{plural} {sizes}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def table1_markdown(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], tasks: Sequence[str],
                    reference: str = "ar", throughput: Throughput = "median",
                    display_names: Mapping[str, str] | None = None,
                    core_steps: bool = False) -> str:
    """Table 1 from summaries[sampler][task] (rows in the mapping's order): "acc% / tokens/s"
    cells; then, for every sampler but `reference`, "accuracy difference in points / speedup";
    then (core_steps=True) the core steps per token, sequential / total. Missing runs show "-"."""
    names = display_names or {}
    key = f"{throughput}_tokens_per_second"
    header = ["Sampler", *(names.get(t, t) for t in tasks)]

    def run(sampler: str, task: str) -> Mapping[str, Any] | None:
        return summaries.get(sampler, {}).get(task)

    def main_cell(sampler: str, task: str) -> str:
        r = run(sampler, task)
        return "-" if r is None else f"{100 * r['accuracy']:.2f}% / " + (
            "-" if r[key] is None else f"{r[key]:.1f}")

    def relative_cell(sampler: str, task: str) -> str:
        r, ref = run(sampler, task), run(reference, task)
        if r is None or ref is None:
            return "-"
        speedup = f"{r[key] / ref[key]:.2f}×" if r[key] and ref[key] else "-"
        return f"{100 * (r['accuracy'] - ref['accuracy']):+.2f} / {speedup}"

    def steps_cell(sampler: str, task: str) -> str:
        r = run(sampler, task)
        if r is None or r["sequential_core_steps_per_token"] is None:
            return "-"
        return f"{r['sequential_core_steps_per_token']:.1f} / {r['core_steps_per_token']:.1f}"

    def table(samplers: Sequence[str], cell) -> list[str]:
        return _markdown(header, [[s, *(cell(s, t) for t in tasks)] for s in samplers])

    batch_sizes = [r["batch_size"] for runs in summaries.values() for r in runs.values()] or [1]
    lines = [f"Accuracy / tokens per second ({throughput_caption(throughput, batch_sizes)})", "",
             *table(list(summaries), main_cell)]
    others = [s for s in summaries if s != reference]
    if reference in summaries and others:
        lines += ["", f"Difference to {reference}: accuracy in points / speedup in tokens per second",
                  "", *table(others, relative_cell)]
    if core_steps:
        lines += ["", "Core steps per generated token: sequential / total", "",
                  *table(list(summaries), steps_cell)]
    return "\n".join(lines) + "\n"
