"""MATH-500 zero-shot with the DeepSeek-R1 instruction, graded by math-verify against `answer`.

Chat prompt (chat=True): an optional system message, then one user message
  "<problem>\\nPlease reason step by step, and put your final answer within \\boxed{}."
Plain prompt (this project's choice; no standard harness defines a plain zero-shot MATH-500
prompt): the framing of lm-eval's minerva_math ("Problem:" / "Solution:") around the same
instruction, so that a base model writes a solution and then, typically, a next "Problem:",
which is the stop string:
  "Problem:\\n<problem>\\n\\nPlease reason step by step, and put your final answer within \\boxed{}.\\n\\nSolution:"

Grading: `math_verify.verify(parse(gold), parse(completion))` with math-verify's default
extraction (LaTeX, including the last \\boxed{}, and plain expressions), the gold answer parsed as
`$<answer>$`. math-verify's timeouts use SIGALRM, which only works in the main thread; elsewhere
they are off.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from huginn_jax.tasks import data
from huginn_jax.tasks.base import INVALID, Doc, Prompt, Task, cut_at_stop, system_messages

SOURCE = data.DataSource("math500/test.jsonl", "HuggingFaceH4/MATH-500", None, "test")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TIMEOUT_SECONDS = 5


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def parse(text: str) -> list:
    """math-verify's parse (its default extraction), [] when nothing is found."""
    from math_verify import parse as mv_parse

    return mv_parse(text, parsing_timeout=_timeout())


def parse_gold(answer: str) -> list:
    return parse(f"${answer}$")


def is_equivalent(gold: list, prediction: list) -> bool:
    from math_verify import verify

    return bool(gold) and bool(prediction) and verify(gold, prediction, timeout_seconds=_timeout())


def shown(parsed: list) -> str:
    """The extracted answer as text (math-verify's matched string), "[invalid]" if none."""
    return str(parsed[-1]) if parsed else INVALID


class MATH500(Task):
    name = "math500"
    max_new_tokens = 1024
    stop_strings = ("Problem:",)
    metrics = ("math_verify",)

    def load_docs(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[Doc]:
        return data.load_docs(self.name, SOURCE, data_dir, limit)

    def doc_id(self, doc: Doc) -> str:
        return doc["unique_id"]

    def render(self, doc: Doc, chat: bool = False, system_prompt: str | None = None) -> Prompt:
        if not chat:
            return f"Problem:\n{doc['problem']}\n\n{INSTRUCTION}\n\nSolution:"
        return [*system_messages(self.resolve_system_prompt(system_prompt)),
                {"role": "user", "content": f"{doc['problem']}\n{INSTRUCTION}"}]

    def gold(self, doc: Doc) -> str:
        return doc["answer"]

    def extract(self, completion: str, chat: bool = False) -> str:
        return shown(parse(cut_at_stop(completion, self.stop_strings)))

    def score(self, doc: Doc, completion: str, chat: bool = False) -> dict[str, Any]:
        prediction = parse(cut_at_stop(completion, self.stop_strings))
        correct = is_equivalent(parse_gold(doc["answer"]), prediction)
        return {"correct": correct, "extracted": shown(prediction), "gold": doc["answer"],
                "metrics": {"math_verify": correct}}

    def oracle_completion(self, doc: Doc, chat: bool = False) -> str:
        """The data set's worked solution (it ends with the answer in \\boxed{})."""
        return f" {doc['solution']}"
