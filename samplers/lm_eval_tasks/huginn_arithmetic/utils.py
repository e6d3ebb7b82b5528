"""Documents and scoring of the `huginn_arithmetic` lm-eval task: those of
`huginn_jax.tasks.arithmetic_eval.Arithmetic` (one source of truth for both harnesses)."""

from __future__ import annotations

from typing import Any

from huginn_jax.tasks.arithmetic_eval import Arithmetic

TASK = Arithmetic()


def dataset(**kwargs: Any):
    """The held-out problems as a `datasets.DatasetDict` with a test split (lm-eval's
    `custom_dataset`; lm-eval passes the task's metadata, which is not needed)."""
    import datasets

    rows = [{**doc, "prompt": TASK.render(doc), "answer": TASK.gold(doc)} for doc in TASK.load_docs()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, bool]:
    return {"exact_match": TASK.score(doc, results[0])["correct"]}
