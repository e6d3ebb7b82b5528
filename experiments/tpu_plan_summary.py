"""TPU plans of several slices side by side: one table and one chart from the JSON files that
`experiments.tpu_plan --output` writes (compiler estimates, see BENCHMARKS.md).

    python -m experiments.tpu_plan_summary --plans=benchmarks/tpu_plans --plot=benchmarks/tpu_plans.png
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from experiments.common import pyplot
from huginn_jax import cli
from samplers.plan import SUMMARY_STEPS, gib, summary_rows

FLAGS = flags.FLAGS
flags.DEFINE_string("plans", "benchmarks/tpu_plans", "A folder of plan JSON files (tpu_plan --output).")
flags.DEFINE_string("plot", None, "Also draw projected tokens/s per slice and sampler to this PNG (matplotlib).")


def load_rows(folder: Path) -> list[dict]:
    """Summary rows of every plan in `folder`, ordered by chip generation, chips and batch."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise cli.UsageError(f"--plans={folder}: no plan JSON files there (write them with experiments.tpu_plan "
                             "--output=FILE)")
    rows = []
    for path in files:
        try:
            rows += summary_rows(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise cli.UsageError(f"--plans: {path} is not a plan that experiments.tpu_plan wrote ({err})") from None
    return sorted(rows, key=lambda r: (r["topology"].split(":")[0], r["devices"], r["batch"]))


def table(rows: list[dict]) -> str:
    """Markdown: a row per slice and batch, the projected tokens/s of each sampler side by side."""
    names = list(SUMMARY_STEPS.values())
    lines = ["| slice | mesh | batch | " + " | ".join(f"{n} tokens/s" for n in names)
             + " | paper-main / static AR | largest step program per chip |",
             "|---|---|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        mesh = f"{r['mesh']['data']}x{r['mesh']['model']}"
        lines.append(f"| {r['topology']} | {mesh} | {r['batch']} | "
                     + " | ".join(f"{r['tokens_per_s'][n]:.4g}" for n in names)
                     + f" | {r['diffusion_vs_ar']:.2f}x | {gib(r['most_bytes_per_chip'])} "
                     f"({100 * r['most_bytes_per_chip'] / r['hbm_bytes']:.0f} %) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """A panel per batch size: bars of projected tokens/s per slice and sampler (log scale)."""
    try:
        plt = pyplot()
    except ImportError as err:
        raise cli.UsageError(f"--plot: {err}") from None
    names = list(SUMMARY_STEPS.values())
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        at = [r for r in rows if r["batch"] == batch]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([x + i * width for x in range(len(at))], [r["tokens_per_s"][name] for r in at], width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(at))], [r["topology"] for r in at])
        ax.set_yscale("log")
        ax.set_ylabel("projected tokens/s (compiler estimate)")
        ax.set_title(f"Huginn-0125 shape, bfloat16, batch {batch}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    rows = load_rows(Path(FLAGS.plans))
    print(table(rows))
    if FLAGS.plot:
        plot(rows, FLAGS.plot)
        print(f"\nwrote {FLAGS.plot}")


if __name__ == "__main__":
    cli.run(main)
