"""Accuracy and speed of every sampler on the arithmetic task's held-out split.

Three measurements on a trained model (default: the embedded one), written under `--output_dir`:

1. Accuracy of greedy static AR as a function of the recurrence r (batched), `accuracy_vs_r.png`.
2. One table, every problem decoded at batch size 1 by each sampler in turn (side by side, so
   that the machine's noise hits all alike): accuracy, tokens/s (after compilation, end to end),
   mean recurrence per generated token. `sampler_table.json`.
3. The analysis tablets of one diffusion run (position vs sampler step: recurrence counts, the
   frozen front, drafted tokens), like the paper's Fig. 4, `diffusion_tablet.png`.

    python -m experiments.evaluate_arithmetic
    python -m experiments.evaluate_arithmetic --checkpoint=runs/arithmetic/model --problems=1000
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from experiments.common import load_task_model, pyplot, quiet_jax_logs
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, demo_problem, heldout_problems, score
from samplers import generate_diffusion_style, generate_minimal
from samplers.arithmetic_table import ROW_NAMES, sampler_table, table_rows
from samplers.diffusion import PRESETS

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", str(EMBEDDED_MODEL), "A converted checkpoint folder with its tokenizer.json.")
flags.DEFINE_integer("problems", 1000, "Held-out problems to evaluate (the first N of the fixed split).")
flags.DEFINE_list("recurrences", ["1", "2", "4", "8", "16", "32", "64"], "r of the accuracy-vs-r sweep.")
flags.DEFINE_list("table", ["ar", "adaptive", "diffusion-main", "diffusion-fast", "speculative"],
                  f"Rows of the sampler table: {', '.join(ROW_NAMES)}.")
flags.DEFINE_integer("num_steps", 32, "Recurrence of static AR, the adaptive cap, the verifier and diffusion prefill.")
flags.DEFINE_integer("max_new_tokens", 10, "Generation budget (the longest answer plus its end token is 9).")
flags.DEFINE_integer("seed", 0, "Seed of the random initial states.")
flags.DEFINE_string("output_dir", "benchmarks", "Where the JSON results and plots go.")


def accuracy_vs_r(params, config, tokenizer, problems, recurrences: list[int], key) -> list[dict]:
    """Greedy static AR over the whole split in one batch per r."""
    prompts = tokenizer.prompt_batch(problems)
    results = []
    for r in tqdm(recurrences, desc="accuracy vs r", unit="r"):
        out = generate_minimal(params, prompts, config=config, max_new_tokens=FLAGS.max_new_tokens, num_steps=r,
                               stop_token_ids=[tokenizer.end_id], key=key)
        correct = [score(tokenizer.decode(seq), p) for seq, p in zip(out.sequences(), problems)]
        results.append({"r": r, "accuracy": float(np.mean(correct)), "problems": len(problems)})
        logging.info("r=%d: accuracy %.4f", r, results[-1]["accuracy"])
    return results


def plot_accuracy_vs_r(results: list[dict], path: Path, trained_mean: int) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["r"] for r in results], [100 * r["accuracy"] for r in results], "o-")
    ax.axvline(trained_mean, color="gray", ls=":", label=f"training mean r = {trained_mean}")
    ax.set(xscale="log", xlabel="recurrence steps r", ylabel="held-out accuracy (%)", ylim=(0, 102),
           title="Arithmetic: accuracy vs recurrence (greedy AR)")
    ax.set_xticks([r["r"] for r in results], [str(r["r"]) for r in results])
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tablet(out, tokenizer, prompt_length: int, path: Path, title: str) -> None:
    """Recurrence count per (step, position) with the frozen front, drafted tokens written in."""
    plt = pyplot()

    counters = np.asarray(out.tablets["counter_tablet"][0], float)  # [steps, positions]
    frozen = np.asarray(out.tablets["frozen_tablet"][0])
    tokens = np.asarray(out.tablets["token_tablet"][0])
    steps = int(out.stats["diffusion_steps"][0])
    first = max(prompt_length - 2, 0)
    last = prompt_length + int(out.lengths[0]) + 1
    counters, frozen, tokens = (a[:steps, first:last] for a in (counters, frozen, tokens))
    shown = np.where(counters > 0, counters, np.nan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * (last - first), 1.0 + 0.32 * steps))
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    front = [np.max(np.nonzero(row > 0)[0], initial=-1) + 0.5 for row in frozen]
    ax.step(front, np.arange(steps), where="mid", color="red", lw=2, label="frozen front")
    for s in range(steps):
        for p in range(tokens.shape[1]):
            if counters[s, p] > 0 and first + p >= prompt_length:
                label = tokenizer.tokenizer.id_to_token(int(tokens[s, p])) or "?"
                ax.text(p, s, "end" if label == "<|end_text|>" else label, ha="center", va="center", fontsize=6,
                        color="white")
    ax.set_xticks(range(last - first), [str(first + p) for p in range(last - first)], fontsize=7)
    ax.set(xlabel="position", ylabel="sampler step", title=title)
    fig.colorbar(image, ax=ax, label="recurrence steps so far")
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    quiet_jax_logs()
    config, params, tokenizer = load_task_model(FLAGS.checkpoint)
    problems = list(heldout_problems()[: FLAGS.problems])
    output_dir = Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, {jax.device_count()} device)"
    rows = table_rows(FLAGS.num_steps)
    unknown = set(FLAGS.table) - set(rows)
    if unknown:
        raise app.UsageError(f"unknown --table rows {sorted(unknown)}; choose from {sorted(rows)}")

    sweep = accuracy_vs_r(params, config, tokenizer, problems, [int(r) for r in FLAGS.recurrences],
                          jax.random.key(FLAGS.seed))
    table = sampler_table(params, config, tokenizer, problems, {name: rows[name] for name in FLAGS.table},
                          max_new_tokens=FLAGS.max_new_tokens, num_steps=FLAGS.num_steps, seed=FLAGS.seed)
    example = demo_problem()
    prompt = [tokenizer.encode_prompt(example)]
    tablet_run = generate_diffusion_style(params, prompt, config=config, max_new_tokens=FLAGS.max_new_tokens,
                                          num_steps=FLAGS.num_steps, stop_token_ids=[tokenizer.end_id],
                                          key=jax.random.key(FLAGS.seed), return_analysis_tablets=True,
                                          **PRESETS["paper-main"])

    result = {"checkpoint": FLAGS.checkpoint, "device": device, "num_steps": FLAGS.num_steps,
              "accuracy_vs_r": sweep, "table": table,
              "command": "python -m experiments.evaluate_arithmetic " + " ".join(
                  f"--{k}={FLAGS[k].serialize().split('=', 1)[1]}" for k in ("problems", "num_steps", "seed"))}
    (output_dir / "arithmetic_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot_accuracy_vs_r(sweep, output_dir / "arithmetic_accuracy_vs_r.png", config.mean_recurrence)
        plot_tablet(tablet_run, tokenizer, len(prompt[0]), output_dir / "arithmetic_diffusion_tablet.png",
                    f"diffusion (paper-main) on {example.prompt} -> "
                    f"{tokenizer.decode(tablet_run.sequences()[0]).split('<')[0]}")
    except ImportError:
        logging.warning("matplotlib is not installed (pip install -e '.[plots]'): no plots written")

    print(f"\nheld-out accuracy vs r ({len(problems)} problems, greedy static AR, {device}):")
    print(" | ".join(f"r={r['r']}: {100 * r['accuracy']:.1f}%" for r in sweep))
    print("\n| sampler | accuracy | tokens/s | vs AR | mean recurrence/token | core position-steps/token |\n"
          "|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['label']} | {100 * t['accuracy']:.1f}% | {t['tokens_per_second']:.1f} | "
              f"{t.get('speedup_vs_ar', float('nan')):.2f}x | {t['mean_recurrence_per_token']:.1f} | "
              f"{t['core_position_steps_per_token']:.1f} |")


if __name__ == "__main__":
    app.run(main)
