"""HumanEval (164 problems), pass@1 by running the tests in the sandbox.

Plain prompt, as lm-eval's `humaneval` (and the original harness): the problem's `prompt` (imports,
function header, docstring); the model writes the body, cut at the first top-level
"\\nclass", "\\ndef", "\\n#", "\\nif" or "\\nprint". With chat=True, lm-eval's
`humaneval_instruct` (the reference README's HumanEval command): the user asks for a solution to
the prompt in a ```python block and the assistant turn is pre-filled with "Here is the completed
function:\\n```python\\n<prompt>\\n", which the model continues (see `base.chat_prompt_text`); its
code ends at the first "```".

The program run is `prompt + code + "\\n" + test + "\\ncheck(<entry_point>)"` (lm-eval's
code_eval); it passes when it exits normally.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from huginn_jax.tasks import data, sandbox
from huginn_jax.tasks.base import Doc, Prompt, Task, cut_at_stop, system_messages

SOURCE = data.DataSource("humaneval/HumanEval.jsonl", "openai/openai_humaneval", None, "test")
INSTRUCTION = "Write a solution to the following problem and make sure that it passes the tests:"
ANSWER_PREFIX = "Here is the completed function:"
FENCE = "```"


def program(doc: Doc, code: str) -> str:
    """The test program of one completion (the code continues the problem's prompt)."""
    return f"{doc['prompt']}{code}\n{doc['test']}\ncheck({doc['entry_point']})"


def code_results(programs: Sequence[str], golds: Sequence[str], extracted: Sequence[str],
                 limits: sandbox.Limits, workers: int | None) -> list[dict[str, Any]]:
    """Score dicts from running the programs in the sandbox (shared by the code tasks)."""
    results = sandbox.run_programs(programs, limits, workers)
    return [{"correct": r.passed, "extracted": code, "gold": gold, "metrics": {"pass@1": r.passed},
             "status": r.status, "stderr_tail": r.stderr_tail}
            for r, code, gold in zip(results, extracted, golds)]


@dataclasses.dataclass(frozen=True)
class HumanEval(Task):
    limits: sandbox.Limits = sandbox.Limits()
    workers: int | None = None  # programs at once; default: the CPU cores

    name = "humaneval"
    max_new_tokens = 1024  # lm-eval's max_gen_toks for humaneval
    stop_strings = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    metrics = ("pass@1",)

    def load_docs(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[Doc]:
        return data.load_docs(self.name, SOURCE, data_dir, limit)

    def doc_id(self, doc: Doc) -> str:
        return doc["task_id"]

    def render(self, doc: Doc, chat: bool = False, system_prompt: str | None = None) -> Prompt:
        if not chat:
            return doc["prompt"]
        return [*system_messages(self.resolve_system_prompt(system_prompt)),
                {"role": "user", "content": f"{INSTRUCTION}\n{FENCE}python\n{doc['prompt']}\n{FENCE}\n"},
                {"role": "assistant", "content": f"{ANSWER_PREFIX}\n{FENCE}python\n{doc['prompt']}\n"}]

    def gold(self, doc: Doc) -> str:
        return doc["canonical_solution"]

    def extract(self, completion: str, chat: bool = False) -> str:
        code = cut_at_stop(completion, self.stop_strings)
        return code.split(FENCE)[0] if chat else code

    def score(self, doc: Doc, completion: str, chat: bool = False) -> dict[str, Any]:
        return self.score_many([doc], [completion], chat)[0]

    def score_many(self, docs: Sequence[Doc], completions: Sequence[str], chat: bool = False,
                   workers: int | None = None) -> list[dict[str, Any]]:
        if len(docs) != len(completions):
            raise ValueError(f"{len(docs)} documents but {len(completions)} completions")
        codes = [self.extract(c, chat) for c in completions]
        return code_results([program(d, c) for d, c in zip(docs, codes)],
                            [self.gold(d) for d in docs], codes, self.limits, workers or self.workers)

    def oracle_completion(self, doc: Doc, chat: bool = False) -> str:
        """The canonical solution (the function body), then what ends it: the next top-level
        statement in plain mode, the closing fence in chat mode."""
        return doc["canonical_solution"] + (f"{FENCE}\n" if chat else "\ndef")
