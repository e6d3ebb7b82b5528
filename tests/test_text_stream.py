"""Streamed text adds up to the full decode, releases text promptly, and ends at a stop string."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from huginn_jax.stop_strings import cut_at_stop_string, find_stop_string
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL
from huginn_jax.text_stream import TextStream
from huginn_jax.tokenizer import load_tokenizer

HUGINN_TOKENIZER = Path(__file__).parent / "fixtures" / "huginn-0125-tokenizer"
TEXTS = ["Hello world. I don't know , do you ?", "€ 日本語のテキスト 😀👍🏽👨‍👩‍👧 é", "Q: 2+2?\nA: 4\n\nQ: next",
         "def f(x):\n    return x  # ' quoted '\n", "a . b ! c 's d 're e 've"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(HUGINN_TOKENIZER)


def stream(tokenizer, ids, chunks, **options) -> tuple[list[str], TextStream]:
    """Pieces from putting `ids` in chunks of the given sizes, then the flush."""
    s = TextStream(tokenizer, **options)
    pieces, at = [], 0
    for size in chunks:
        pieces.append(s.put(ids[at:at + size]))
        at += size
    pieces.append(s.flush())
    return pieces, s


def random_sequences(tokenizer, rng, count: int) -> list[list[int]]:
    """Encoded texts (whole, or with tokens of a multi-byte character split apart) and random ids
    rich in tokens that hold part of a UTF-8 character, spaces before punctuation and special tokens."""
    partial = [i for i, b in enumerate(tokenizer.token_bytes) if _incomplete(b)]
    punctuation = tokenizer.encode(" . , ? ! n't 's 're 've 'm ' ", add_special_tokens=False)
    sequences = [tokenizer.encode(t) for t in TEXTS]
    for _ in range(count):
        n = int(rng.integers(1, 30))
        pools = [np.arange(65536), np.asarray(partial), np.asarray(punctuation), np.arange(65504, 65536)]
        sequences.append([int(rng.choice(pools[k])) for k in rng.choice(4, size=n, p=[0.3, 0.35, 0.25, 0.1])])
    return sequences


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@pytest.mark.parametrize("clean_up", [None, False])
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_pieces_add_up_to_the_full_decode(tokenizer, clean_up, skip_special_tokens):
    rng = np.random.default_rng(0)
    for ids in random_sequences(tokenizer, rng, 120):
        chunks = rng.integers(1, 4, size=len(ids)).tolist()
        options = dict(skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up)
        pieces, s = stream(tokenizer, ids, chunks, **options)
        full = tokenizer.decode(ids, **options)
        assert "".join(pieces) == s.text == full, ids
        # a piece never shows U+FFFD for a character that later tokens complete
        replacements = [i for i, ch in enumerate("".join(pieces)) if ch == "\ufffd"]
        assert replacements == [i for i, ch in enumerate(full) if ch == "\ufffd"]


def test_split_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("😀 日本", add_special_tokens=False)
    partial_prefix = next(k for k in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:k]))
    s = TextStream(tokenizer)
    pieces = [s.put(i) for i in ids] + [s.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[partial_prefix - 1] == ""  # the first byte(s) of the emoji alone show nothing
    assert "".join(pieces) == "😀 日本"


def test_text_is_released_promptly(tokenizer):
    """Only an unfinished character, or text after a recent space (clean-up), waits."""
    text = "Streaming text arrives word by word, as the tokens become final."
    ids = tokenizer.encode(text, add_special_tokens=False)
    for clean_up, most_held in ((False, 0), (True, 3)):
        s = TextStream(tokenizer, clean_up_tokenization_spaces=clean_up)
        shown = ""
        for k, token in enumerate(ids):
            shown += s.put(token)
            full = tokenizer.decode(ids[:k + 1], clean_up_tokenization_spaces=clean_up)
            assert full.startswith(shown) and len(full) - len(shown) <= most_held + 1
        assert shown + s.flush() == tokenizer.decode(ids, clean_up_tokenization_spaces=clean_up)


def test_clean_up_is_applied_across_pieces(tokenizer):
    ids = tokenizer.encode("Really ? I do n't know .", add_special_tokens=False)
    pieces, _ = stream(tokenizer, ids, [1] * len(ids))
    assert "".join(pieces) == "Really? I don't know." == tokenizer.decode(ids)


STOPS = ["Q:", "\n\n", "</s>", "日本"]


def test_a_stop_string_ends_the_stream_before_it(tokenizer):
    rng = np.random.default_rng(1)
    stop_ids = [tokenizer.encode(s, add_special_tokens=False) for s in STOPS]
    stopped = 0
    for ids in random_sequences(tokenizer, rng, 80):
        for _ in range(int(rng.integers(0, 3))):  # plant stop strings at random places
            at = int(rng.integers(0, len(ids) + 1))
            ids = ids[:at] + stop_ids[int(rng.integers(len(STOPS)))] + ids[at:]
        pieces, s = stream(tokenizer, ids, rng.integers(1, 4, size=len(ids)).tolist(), stop_strings=STOPS)
        full = tokenizer.decode(ids)
        assert "".join(pieces) == s.text == cut_at_stop_string(full, STOPS), ids
        assert s.stopped == (find_stop_string(full, STOPS) is not None)
        stopped += s.stopped
    assert 20 < stopped < 80


def test_the_start_of_a_stop_string_is_held_back_and_then_shown(tokenizer):
    s = TextStream(tokenizer, stop_strings=["Q: "], clean_up_tokenization_spaces=False)
    assert s.put(tokenizer.encode("Answer Q", add_special_tokens=False)) == "Answer "
    assert s.put(tokenizer.encode(":", add_special_tokens=False)) == ""
    assert s.put(tokenizer.encode("x", add_special_tokens=False)) == "Q:x"
    assert not s.stopped
    assert s.put(tokenizer.encode(" Q", add_special_tokens=False)) == " "
    assert s.flush() == "Q" and not s.stopped
    s = TextStream(tokenizer, stop_strings=["Q: "], clean_up_tokenization_spaces=False)
    assert s.put(tokenizer.encode("A Q: b", add_special_tokens=False)) == "A " and s.stopped
    assert s.put(tokenizer.encode("more", add_special_tokens=False)) == "" and s.flush() == ""


def test_the_embedded_arithmetic_tokenizer_streams():
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    ids = tokenizer.encode("1234+5678=6913", add_special_tokens=False) + [tokenizer.eos_token_id]
    pieces, _ = stream(tokenizer, ids, [1] * len(ids), stop_strings=["<|end_text|>"])
    assert pieces[:3] == ["1", "2", "3"] and "".join(pieces) == "1234+5678=6913"


def test_empty_stop_string_is_refused(tokenizer):
    with pytest.raises(ValueError, match="stop string 0 is empty"):
        TextStream(tokenizer, stop_strings=[""])
