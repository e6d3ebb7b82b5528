"""The common interface of the evaluation tasks (GSM8K CoT, MATH500, HumanEval, MBPP, arithmetic).

A task turns a document (one record of its data set, a dict) into a prompt, and a completion (the
generated text) into a score; nothing here generates text. The runner:

  docs = task.load_docs(data_dir, limit)               # offline files or the hub's copies
  prompt = task.render(doc, chat, system_prompt)       # str, or chat messages (list of dicts)
  text = prompt if a str else chat_prompt_text(prompt, tokenizer.apply_chat_template)
  ... generate up to task.max_new_tokens, stopping at task.stop_strings (and end-of-text ids) ...
  scores = task.score_many(docs, completions, chat)    # dicts: correct, extracted, gold, metrics

`score` cuts the completion at the first stop string itself (as lm-eval's generate_until does), so
it accepts the raw or the already-cut text. `oracle_completion(doc)` is the data set's own answer
written the way a model would write it; scoring it checks prompts, extraction and grading
(`huginn_jax.tasks.oracle`).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

Doc = dict[str, Any]
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
Prompt = str | list[Message]
INVALID = "[invalid]"  # lm-eval's fallback when an answer cannot be extracted


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (lm-eval's `until` handling)."""
    for stop in stop_strings:
        if stop:
            text = text.split(stop)[0]
    return text


def chat_prompt_text(messages: Sequence[Message], apply_chat_template: Callable[..., str]) -> str:
    """The prompt text of chat messages, exactly as transformers / lm-eval render it.

    `apply_chat_template(messages, add_generation_prompt=..., tokenize=False)` returns the
    template's text (`huginn_jax.tokenizer.Tokenizer`'s and transformers' method both do). When
    the last message is the assistant's (a prefix it should continue, e.g. humaneval's "Here is
    the completed function: ..."), the text ends inside that message, as transformers'
    `continue_final_message=True`: the template runs with a marker appended to the message and the
    text is cut at the marker (then right-stripped if the template trimmed the message).
    """
    messages = [dict(m) for m in messages]
    if messages[-1]["role"] != "assistant":
        return apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    marker = "CONTINUE_FINAL_MESSAGE_TAG "
    messages[-1]["content"] += marker
    rendered = apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    at = rendered.rindex(marker.strip())
    return rendered[:at] if rendered[at: at + len(marker)] == marker else rendered[:at].rstrip()


def system_messages(system_prompt: str | None) -> list[Message]:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


class Task(abc.ABC):
    """One evaluation task. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    max_new_tokens: ClassVar[int]
    stop_strings: ClassVar[tuple[str, ...]]
    metrics: ClassVar[tuple[str, ...]]  # keys of score()["metrics"]; the first is `correct`
    # The system prompt of chat prompts when render() gets system_prompt=None ("" for none).
    default_system_prompt: ClassVar[str | None] = None

    @abc.abstractmethod
    def load_docs(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[Doc]:
        """The evaluation documents, in the data set's order, the first `limit` of them."""

    @abc.abstractmethod
    def doc_id(self, doc: Doc) -> int | str:
        """A stable identifier of the document within the task (for records and resuming)."""

    @abc.abstractmethod
    def render(self, doc: Doc, chat: bool = False, system_prompt: str | None = None) -> Prompt:
        """The prompt: plain text, or (chat=True) the messages for the tokenizer's chat template."""

    @abc.abstractmethod
    def gold(self, doc: Doc) -> str:
        """The reference answer as the records show it."""

    @abc.abstractmethod
    def extract(self, completion: str, chat: bool = False) -> str:
        """The answer (or code) the primary metric grades, from the completion."""

    @abc.abstractmethod
    def oracle_completion(self, doc: Doc, chat: bool = False) -> str:
        """The data set's own answer or solution, formatted as a model would write it."""

    def resolve_system_prompt(self, system_prompt: str | None) -> str | None:
        return self.default_system_prompt if system_prompt is None else (system_prompt or None)

    @abc.abstractmethod
    def score(self, doc: Doc, completion: str, chat: bool = False) -> dict[str, Any]:
        """{"correct": bool, "extracted": str, "gold": str, "metrics": {name: bool}, ...}."""

    def score_many(self, docs: Sequence[Doc], completions: Sequence[str], chat: bool = False,
                   workers: int | None = None) -> list[dict[str, Any]]:
        """`score` of many documents (code tasks run their programs `workers` at a time)."""
        if len(docs) != len(completions):
            raise ValueError(f"{len(docs)} documents but {len(completions)} completions")
        return [self.score(doc, completion, chat) for doc, completion in zip(docs, completions)]
