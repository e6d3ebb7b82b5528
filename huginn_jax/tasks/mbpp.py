"""MBPP (the 500 test problems, task_ids 11-510) with the standard 3-shot prompt, pass@1.

The prompt is lm-eval's `mbpp` task (the format of the MBPP paper): for each of the shots (task_ids
2, 3, 4) and then the problem,

  You are an expert Python programmer, and here is your task: <text> Your code should pass these tests:\\n\\n
  <test 1>\\n<test 2>\\n<test 3>\\n[BEGIN]\\n

with each shot followed by its code, "\\n[DONE]" and a blank line. The model's code ends at
"[DONE]". With chat=True, the same turns as a multi-turn conversation (lm-eval's
`--apply_chat_template --fewshot_as_multiturn`): each shot a user turn and an assistant turn
("<code>\\n[DONE]"), then the problem as the last user turn.

The program run is `code + "\\n" + tests` as lm-eval's code_eval, with the problem's
`test_setup_code` between them where it has one (only task 367 of the test split, whose tests use
trees built there; lm-eval omits it, so that problem cannot pass there).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from huginn_jax.tasks import data, sandbox
from huginn_jax.tasks.base import Doc, Message, Prompt, Task, cut_at_stop, system_messages
from huginn_jax.tasks.humaneval import code_results

SOURCE = data.DataSource("mbpp/mbpp.jsonl", "google-research-datasets/mbpp", "full", "test")
TEST_IDS = range(11, 511)
DONE = "[DONE]"

# The three prompt problems (task_ids 2, 3, 4 of mbpp.jsonl), fields as published.
FEWSHOT = (
    {"task_id": 2,
     "text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & "
             "set(test_tup2))\r\n  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                   "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                   "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"]},
    {"task_id": 3,
     "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in "
             "range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            result = "
             "True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"]},
    {"task_id": 4,
     "text": "Write a function to find the largest integers from a given list of numbers using "
             "heap queue algorithm.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = "
             "hq.nlargest(n, nums)\r\n  return largest_nums",
     "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"]},
)


def problem_text(doc: Doc) -> str:
    tests = "\n".join(doc["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def solution_text(doc: Doc) -> str:
    return f"{doc['code']}\n{DONE}"


def program(doc: Doc, code: str) -> str:
    setup = doc.get("test_setup_code") or ""
    parts = [code, setup] if setup.strip() else [code]
    return "\n".join([*parts, *doc["test_list"]])


@dataclasses.dataclass(frozen=True)
class MBPP(Task):
    limits: sandbox.Limits = sandbox.Limits()
    workers: int | None = None  # programs at once; default: the CPU cores

    name = "mbpp"
    max_new_tokens = 256  # lm-eval's default max_gen_toks (mbpp does not set one)
    stop_strings = (DONE,)
    metrics = ("pass@1",)

    def load_docs(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[Doc]:
        return data.load_docs(self.name, SOURCE, data_dir, limit,
                              keep=lambda doc: doc["task_id"] in TEST_IDS)

    def doc_id(self, doc: Doc) -> int:
        return doc["task_id"]

    def render(self, doc: Doc, chat: bool = False, system_prompt: str | None = None) -> Prompt:
        if not chat:
            shots = "".join(f"{problem_text(shot)}{solution_text(shot)}\n\n" for shot in FEWSHOT)
            return (system_prompt or "") + shots + problem_text(doc)
        messages: list[Message] = system_messages(self.resolve_system_prompt(system_prompt))
        for shot in FEWSHOT:
            messages += [{"role": "user", "content": problem_text(shot)},
                         {"role": "assistant", "content": solution_text(shot)}]
        return messages + [{"role": "user", "content": problem_text(doc)}]

    def gold(self, doc: Doc) -> str:
        return doc["code"]

    def extract(self, completion: str, chat: bool = False) -> str:
        return cut_at_stop(completion, self.stop_strings)

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
        return solution_text(doc)
