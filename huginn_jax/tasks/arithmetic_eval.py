"""The embedded model's addition task (`huginn_jax.tasks.arithmetic`) as an evaluation task.

Its documents are the fixed held-out problems (no data files: the harness runs offline on a real
trained model). The prompt is text for the model's own character tokenizer (the tokenizer.json
next to the embedded model): the begin token then `a+b=`, both numbers least-significant digit
first, e.g. "<|begin_text|>59+7=". Encoded with that tokenizer without adding special tokens it is
exactly `TaskTokenizer.encode_prompt`. The completion is the decoded generation up to and
including the end token; it is correct when the text before the end token is the sum.
There is no chat format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huginn_jax.tasks import arithmetic
from huginn_jax.tasks.base import Doc, Prompt, Task, cut_at_stop


class Arithmetic(Task):
    name = "arithmetic"
    max_new_tokens = arithmetic.MAX_DIGITS + 2  # the longest sum and the end token
    stop_strings = (arithmetic.END,)
    metrics = ("exact_match",)

    def load_docs(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[Doc]:
        """The held-out problems (data_dir is not used: they are generated from a fixed seed)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        count = arithmetic.HELDOUT_SIZE if limit is None else min(limit, arithmetic.HELDOUT_SIZE)
        return [{"doc_id": i, "a": p.a, "b": p.b}
                for i, p in enumerate(arithmetic.heldout_problems()[:count])]

    @staticmethod
    def problem(doc: Doc) -> arithmetic.Problem:
        return arithmetic.Problem(doc["a"], doc["b"])

    def doc_id(self, doc: Doc) -> int:
        return doc["doc_id"]

    def render(self, doc: Doc, chat: bool = False, system_prompt: str | None = None) -> Prompt:
        if chat:
            raise ValueError("the arithmetic task has no chat format (its tokenizer has no chat "
                             "template); run it without --chat")
        return arithmetic.BEGIN + self.problem(doc).prompt

    def gold(self, doc: Doc) -> str:
        return self.problem(doc).answer

    def extract(self, completion: str, chat: bool = False) -> str:
        return cut_at_stop(completion, self.stop_strings).strip()

    def score(self, doc: Doc, completion: str, chat: bool = False) -> dict[str, Any]:
        correct = arithmetic.score(completion, self.problem(doc))
        return {"correct": correct, "extracted": self.extract(completion), "gold": self.gold(doc),
                "metrics": {"exact_match": correct}}

    def oracle_completion(self, doc: Doc, chat: bool = False) -> str:
        return self.problem(doc).answer + arithmetic.END
