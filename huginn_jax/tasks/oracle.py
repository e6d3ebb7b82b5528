"""The oracle check: score each data set's own reference answers through the task's own path.

`oracle_completion(doc)` is the reference answer or solution written as a model would write it
(GSM8K's worked answer ending "The answer is N.", MATH's solution with its \\boxed{} answer, the
canonical HumanEval body, the MBPP reference code followed by [DONE]). Scoring those with the same
stop handling, extraction, grading and sandbox as generations must give 100 %; a miss is either a
harness bug or a data/grader limitation to be explained.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from huginn_jax.tasks.base import Doc, Task


@dataclasses.dataclass(frozen=True)
class OracleResult:
    task: str
    num_docs: int
    accuracy: dict[str, float]  # per metric, in [0, 1]
    misses: list[dict[str, Any]]  # one per (document, metric) that failed


def run_oracle(task: Task, docs: Sequence[Doc], chat: bool = False,
               workers: int | None = None) -> OracleResult:
    completions = [task.oracle_completion(doc, chat) for doc in docs]
    scores = task.score_many(docs, completions, chat=chat, workers=workers)
    accuracy = {metric: (sum(s["metrics"][metric] for s in scores) / len(scores) if scores else 0.0)
                for metric in task.metrics}
    misses = [{"doc_id": task.doc_id(doc), "metric": metric, "gold": score["gold"],
               "extracted": score["extracted"],
               **{k: score[k] for k in ("status", "stderr_tail") if k in score}}
              for doc, score in zip(docs, scores) for metric in task.metrics
              if not score["metrics"][metric]]
    return OracleResult(task.name, len(docs), accuracy, misses)
