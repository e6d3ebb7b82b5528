"""GSM8K with 8-shot chain of thought, exactly as lm-evaluation-harness's `gsm8k_cot` task (v3.0).

Plain prompt (what lm-eval renders without a chat template):

  Q: <exemplar question>\\nA: <exemplar chain of thought ending "The answer is N.">\\n\\n  (x 8)
  Q: <question>\\nA:

With chat=True, the reference README's protocol (`--apply_chat_template --fewshot_as_multiturn
--system_instruction=...`): a system message (default: the README's math prompt), then each
exemplar as a user turn ("Q: ...\\nA:") and an assistant turn (its chain of thought), then the
question as the last user turn; the runner applies the tokenizer's chat template with the
generation prompt. A system prompt given in plain mode is prepended with no separator, as lm-eval
does.

Scoring: lm-eval's two filters, each followed by its exact-match metric (case-insensitive, with
",", "$", anything up to "#### " and a final "." removed from both sides):
  strict-match:      first match of `The answer is (\\-?[0-9\\.\\,]+).`, else "[invalid]";
  flexible-extract:  last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`, else "[invalid]".
`correct` is flexible-extract (the paper's number); both are in `metrics`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huginn_jax.tasks import data
from huginn_jax.tasks.base import INVALID, Doc, Message, Prompt, Task, cut_at_stop, system_messages

SOURCE = data.DataSource("gsm8k/test.jsonl", "openai/gsm8k", "main", "test")
SYSTEM_PROMPT = "You are a helpful assistant that can assist users with mathematical reasoning."
STRICT_PATTERN = r"The answer is (\-?[0-9\.\,]+)."
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORED_PATTERNS = (",", r"\$", "(?s).*#### ", r"\.$")  # the metric's regexes_to_ignore
_CALCULATOR = re.compile(r"<<[^>]*>>")

# The 8 exemplars of gsm8k-cot.yaml (Wei et al., 2022), question and target.
FEWSHOT = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After "
     "they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So "
     "there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
     "parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have "
     "left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
     "After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
     "lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave "
     "Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys "
     "does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more "
     "toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, "
     "from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * "
     "4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
     "How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After "
     "losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has "
     "23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
)


def question_text(question: str) -> str:
    return f"Q: {question}\nA:"


def regex_filter(completion: str, pattern: str, group_select: int = 0) -> str:
    """lm-eval's RegexFilter: the `group_select`-th match (its first non-empty group when the
    pattern has several), stripped; "[invalid]" when nothing matches."""
    matches = re.findall(pattern, completion)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), INVALID)
    return match.strip()


def strict_match(completion: str) -> str:
    return regex_filter(completion, STRICT_PATTERN)


def flexible_extract(completion: str) -> str:
    return regex_filter(completion, FLEXIBLE_PATTERN, group_select=-1)


def normalize(text: str) -> str:
    """The exact-match metric's normalisation (regexes_to_ignore, then ignore_case)."""
    for pattern in IGNORED_PATTERNS:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


class GSM8KCoT(Task):
    name = "gsm8k_cot"
    max_new_tokens = 256  # lm-eval's default max_gen_toks (gsm8k_cot does not set one)
    stop_strings = ("Q:", "</s>", "<|im_end|>")
    metrics = ("flexible_extract", "strict_match")
    default_system_prompt = SYSTEM_PROMPT

    def load_docs(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[Doc]:
        docs = data.load_docs(self.name, SOURCE, data_dir, limit)
        return [{"doc_id": i, **doc} for i, doc in enumerate(docs)]

    def doc_id(self, doc: Doc) -> int:
        return doc["doc_id"]

    def render(self, doc: Doc, chat: bool = False, system_prompt: str | None = None) -> Prompt:
        if not chat:
            shots = "".join(f"{question_text(q)} {a}\n\n" for q, a in FEWSHOT)
            return (system_prompt or "") + shots + question_text(doc["question"])
        messages: list[Message] = system_messages(self.resolve_system_prompt(system_prompt))
        for question, answer in FEWSHOT:
            messages += [{"role": "user", "content": question_text(question)},
                         {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": question_text(doc["question"])}]

    def gold(self, doc: Doc) -> str:
        return doc["answer"].split("####")[-1].strip()

    def extract(self, completion: str, chat: bool = False) -> str:
        return flexible_extract(cut_at_stop(completion, self.stop_strings))

    def score(self, doc: Doc, completion: str, chat: bool = False) -> dict[str, Any]:
        completion = cut_at_stop(completion, self.stop_strings)
        gold = self.gold(doc)
        flexible, strict = flexible_extract(completion), strict_match(completion)
        metrics = {"flexible_extract": exact_match(flexible, gold),
                   "strict_match": exact_match(strict, gold)}
        return {"correct": metrics["flexible_extract"], "extracted": flexible,
                "extracted_strict": strict, "gold": gold, "metrics": metrics}

    def oracle_completion(self, doc: Doc, chat: bool = False) -> str:
        """The data set's worked solution in the exemplars' style: calculator annotations
        (<<48/2=24>>) removed, lines joined, "#### N" replaced by "The answer is N.", followed by
        the next question's "Q:" as a base model continues (the stop string)."""
        steps, _, _ = doc["answer"].rpartition("####")
        steps = " ".join(line.strip() for line in _CALCULATOR.sub("", steps).splitlines() if line.strip())
        return f" {steps} The answer is {self.gold(doc)}.\n\nQ:"
