"""Multi-digit addition written as text: generator, tokenizer, exact scorer, fixed held-out split.

A problem is `a+b=` and its answer the digits of a + b; every number is written least-significant
digit first ("7654321" is 1234567), so that each answer digit depends on the two digits at its
place and the carry out of the digit before it, the form in which small transformers learn
addition. A text is `<|begin_text|>` + prompt + answer + `<|end_text|>`, tokenized one character
per token by a `tokenizers` tokenizer (`tokenizer.json`), the library Huginn-0125's tokenizer uses.

The held-out split is a fixed list drawn from its own seed; training batches never contain one of
its problems, so accuracy on it measures generalisation, not memory.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

BEGIN, END, PAD = "<|begin_text|>", "<|end_text|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, BEGIN, END)
CHARACTERS = "0123456789+="
VOCAB = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
MAX_DIGITS = 7  # operands have 1..MAX_DIGITS digits
HELDOUT_SEED = 20_251_014
HELDOUT_SIZE = 1000
# The model trained on this task that ships with the package (python -m experiments.train).
EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "arithmetic-tiny"


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        """`a+b=` with least-significant digits first, without the begin token."""
        return f"{reverse_digits(self.a)}+{reverse_digits(self.b)}="

    @property
    def answer(self) -> str:
        return reverse_digits(self.a + self.b)

    @property
    def text(self) -> str:
        """The full training text: begin token, prompt, answer, end token."""
        return f"{BEGIN}{self.prompt}{self.answer}{END}"


def reverse_digits(n: int) -> str:
    return str(n)[::-1]


def max_text_tokens(max_digits: int = MAX_DIGITS) -> int:
    """Tokens in the longest text: begin, two operands, '+', '=', the sum, end."""
    return 1 + 2 * max_digits + 2 + (max_digits + 1) + 1


def sample_problems(rng: np.random.Generator, count: int, max_digits: int = MAX_DIGITS) -> list[Problem]:
    """Operands whose digit counts are uniform in 1..max_digits (then uniform among those numbers),
    so that short and long additions are equally frequent."""
    digits = rng.integers(1, max_digits + 1, size=(count, 2))
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    values = rng.integers(low, 10 ** digits)
    return [Problem(int(a), int(b)) for a, b in values]


@functools.cache
def heldout_problems(count: int = HELDOUT_SIZE) -> tuple[Problem, ...]:
    """The fixed held-out split: the first `count` distinct problems drawn from HELDOUT_SEED."""
    rng = np.random.default_rng(HELDOUT_SEED)
    seen: dict[Problem, None] = {}
    while len(seen) < count:
        for problem in sample_problems(rng, HELDOUT_SIZE):  # the same draws whatever the count
            seen.setdefault(problem)
            if len(seen) == count:
                break
    return tuple(seen)


@functools.cache
def _heldout_set() -> frozenset[Problem]:
    return frozenset(heldout_problems())


def demo_problem() -> Problem:
    """The held-out problem the main job shows: the first with a 7-digit sum (a long answer)."""
    return next(p for p in heldout_problems() if len(p.answer) >= MAX_DIGITS)


def training_problems(seed: int, step: int, count: int) -> list[Problem]:
    """The problems of one training batch, a pure function of (seed, step) so that a resumed run
    sees the same data; problems of the held-out split are replaced by fresh draws."""
    rng = np.random.default_rng([seed, step])
    heldout = _heldout_set()
    problems = [p for p in sample_problems(rng, count) if p not in heldout]
    while len(problems) < count:
        problems += [p for p in sample_problems(rng, count - len(problems)) if p not in heldout]
    return problems


def score(generated: str, problem: Problem) -> bool:
    """Exact match: the generated text, up to the end token, is the answer."""
    return generated.split(END, 1)[0].strip() == problem.answer


# ---------------------------------------------------------------- tokenizer

def build_tokenizer():
    """A `tokenizers.Tokenizer` with one token per character and the special tokens above."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=PAD))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


class TaskTokenizer:
    """Encodes prompts and decodes answers of this task with a tokenizer.json (the same code path
    as Huginn-0125's tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        for token, expected in VOCAB.items():
            if tokenizer.token_to_id(token) != expected:
                raise ValueError(f"tokenizer maps {token!r} to {tokenizer.token_to_id(token)}, "
                                 f"this task expects {expected}")
        self.pad_id, self.begin_id, self.end_id = (VOCAB[t] for t in SPECIAL_TOKENS)

    @classmethod
    def from_file(cls, path: str) -> "TaskTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode_prompt(self, problem: Problem) -> list[int]:
        return [self.begin_id, *self.tokenizer.encode(problem.prompt, add_special_tokens=False).ids]

    def encode_text(self, problem: Problem) -> list[int]:
        return [*self.encode_prompt(problem), *self.tokenizer.encode(problem.answer).ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of generated ids, cut at the first end token (which is kept)."""
        ids = [int(i) for i in ids]
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id) + 1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def prompt_batch(self, problems: Sequence[Problem]) -> list[list[int]]:
        return [self.encode_prompt(p) for p in problems]

    def training_batch(self, problems: Sequence[Problem], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded texts [B, length] and a loss mask [B, length] that is 1 where the target
        (the next token) is part of the answer or the end token."""
        tokens = np.full((len(problems), length), self.pad_id, np.int32)
        mask = np.zeros((len(problems), length), np.float32)
        for row, problem in enumerate(problems):
            text = self.encode_text(problem)
            if len(text) > length:
                raise ValueError(f"{problem.text!r} has {len(text)} tokens, more than the length {length}")
            tokens[row, : len(text)] = text
            prompt = len(self.encode_prompt(problem))
            mask[row, prompt - 1: len(text) - 1] = 1.0  # positions whose next token is answer or end
        return tokens, mask
