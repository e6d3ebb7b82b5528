"""Stop strings on the device against transformers' StopStringCriteria and a naive host search."""

from __future__ import annotations

import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from huginn_jax.stop_strings import (advance, build_stop_string_table, check_stop_strings, cut_at_stop_string,
                                     ends_with_stop_string, ends_with_stop_string_at, find_stop_string,
                                     stop_string_hits)
from huginn_jax.tokenizer import load_tokenizer

HUGINN_TOKENIZER = Path(__file__).parent / "fixtures" / "huginn-0125-tokenizer"

ASCII_STOP_SETS = [
    ["Q:", "</s>", "<|im_end|>", "\n\n"],
    ["\n"],                          # one character, also inside many tokens
    [":"],
    ["<|end_turn|>", "Answer:"],     # a special token's text, and a multi-token string
    ["ing the", " the"],             # strings across a space; one a suffix of the other
    ["abcd", "bc", "aa"],            # overlapping strings, a self-overlapping string
]
UNICODE_STOP_SETS = [["€", "日本", "😀", "é"]]  # multi-byte: tokens split their characters

hits_fn = jax.jit(stop_string_hits)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(HUGINN_TOKENIZER)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(HUGINN_TOKENIZER))


@pytest.fixture(scope="module")
def hf_token_bytes(hf):
    """Every id's bytes, derived independently of huginn_jax from transformers' GPT-2 byte map."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    tokens = hf.convert_ids_to_tokens(list(range(len(hf))))
    return [bytes(byte_of[c] for c in t) if all(c in byte_of for c in t) else t.encode() for t in tokens]


def naive_hits(token_bytes, ids: list[int], stop_strings) -> list[bool]:
    """Per position: some stop string occurrence (in the bytes of all tokens) ends inside that token."""
    pieces = [token_bytes[i] for i in ids]
    text = b"".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    hit = [False] * len(ids)
    for s in stop_strings:
        pattern = s.encode()
        start = text.find(pattern)
        while start >= 0:
            hit[int(np.searchsorted(ends, start + len(pattern) - 1, side="right"))] = True
            start = text.find(pattern, start + 1)
    return hit


def relevant_pool(token_bytes, stop_strings) -> np.ndarray:
    """Tokens that can take part in a match: pieces of a stop string, tokens that contain one
    (overhanging on both sides), that begin with its end or end with its beginning."""
    key = (len(token_bytes), tuple(stop_strings))
    if key not in _POOLS:
        pool = set()
        for s in stop_strings:
            p = s.encode()
            for i, b in enumerate(token_bytes):
                if b and not set(p).isdisjoint(b) and (b in p or p in b or any(
                        b.startswith(p[k:]) or b.endswith(p[:k]) for k in range(1, len(p)))):
                    pool.add(i)
        _POOLS[key] = np.asarray(sorted(pool))
    return _POOLS[key]


_POOLS: dict = {}


def spelled(rng, token_bytes, text: bytes) -> list[int]:
    """`text` cut at random points into pieces that are tokens (single bytes are always tokens)."""
    ids_of = _ids_of_bytes(token_bytes)
    cuts = sorted({0, len(text), *rng.integers(0, len(text) + 1, size=int(rng.integers(0, len(text) + 1)))})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        piece = text[a:b]
        out += [ids_of[piece]] if piece in ids_of else [ids_of[bytes([c])] for c in piece]
    return out


_IDS_OF = {}


def _ids_of_bytes(token_bytes) -> dict[bytes, int]:
    key = id(token_bytes)
    if key not in _IDS_OF:
        _IDS_OF[key] = {b: i for i, b in reversed(list(enumerate(token_bytes))) if b}
    return _IDS_OF[key]


def random_rows(rng, token_bytes, stop_strings, count: int, length: int) -> np.ndarray:
    """Rows of: a stop string (or most of one) spelled out in random pieces with random context
    (15%), tokens that can take part in a match (55%), any id of the vocabulary (30%: specials and
    partial UTF-8 characters included)."""
    pool = relevant_pool(token_bytes, stop_strings)
    context = [b"", b"", b" ", b"x", b"\n", b"Q", b".", "é".encode()]
    rows = np.zeros((count, length), np.int64)
    for r in range(count):
        row: list[int] = []
        while len(row) < length:
            u = rng.random()
            if u < 0.15:
                target = stop_strings[int(rng.integers(len(stop_strings)))].encode()
                if rng.random() < 0.3:
                    target = target[:int(rng.integers(1, len(target) + 1))]
                row += spelled(rng, token_bytes, context[rng.integers(len(context))] + target
                               + context[rng.integers(len(context))])
            elif u < 0.7:
                row.append(int(rng.choice(pool)))
            else:
                row.append(int(rng.integers(0, len(token_bytes))))
        rows[r] = row[:length]
    return rows


def seed_of(stop_strings) -> int:
    return zlib.crc32(repr(stop_strings).encode())


@pytest.mark.parametrize("stop_strings", ASCII_STOP_SETS + UNICODE_STOP_SETS, ids=repr)
def test_device_hits_equal_a_naive_search(tokenizer, hf_token_bytes, stop_strings):
    table = build_stop_string_table(tokenizer, stop_strings)
    ids = random_rows(np.random.default_rng(seed_of(stop_strings)), hf_token_bytes, stop_strings, 96, 24)
    got = np.asarray(hits_fn(table.transitions, ids, np.ones(ids.shape, bool)))
    want = np.asarray([naive_hits(hf_token_bytes, row.tolist(), stop_strings) for row in ids])
    np.testing.assert_array_equal(got, want)
    assert 0.02 < want.mean() < 0.9  # the sequences exercise both outcomes


@pytest.mark.parametrize("stop_strings", ASCII_STOP_SETS, ids=repr)
def test_device_hits_equal_transformers_stop_string_criteria(tokenizer, hf, stop_strings):
    import torch
    from transformers.generation.stopping_criteria import StopStringCriteria

    criteria = StopStringCriteria(hf, stop_strings)
    table = build_stop_string_table(tokenizer, stop_strings)
    ids = random_rows(np.random.default_rng(seed_of(stop_strings) + 1), tokenizer.token_bytes, stop_strings, 64, 16)
    got = np.asarray(hits_fn(table.transitions, ids, np.ones(ids.shape, bool)))
    want = np.stack([criteria(torch.as_tensor(ids[:, :t + 1]), None).numpy() for t in range(ids.shape[1])], 1)
    np.testing.assert_array_equal(got, want)
    assert want.any()


@pytest.mark.parametrize("stop_strings", ASCII_STOP_SETS, ids=repr)
def test_hits_follow_the_decoded_text(tokenizer, stop_strings):
    """A position hits iff decoding it adds an occurrence of a stop string to the text (ASCII stop
    strings: a split character decodes to U+FFFD, never to ASCII)."""
    table = build_stop_string_table(tokenizer, stop_strings)
    ids = random_rows(np.random.default_rng(seed_of(stop_strings) + 2), tokenizer.token_bytes, stop_strings, 32, 16)
    got = np.asarray(hits_fn(table.transitions, ids, np.ones(ids.shape, bool)))

    def occurrences(text: str) -> int:
        return sum(text[i:].startswith(s) for s in stop_strings for i in range(len(text)))

    for row, hits in zip(ids.tolist(), got):
        counts = [occurrences(tokenizer.decode(row[:t], clean_up_tokenization_spaces=False))
                  for t in range(len(row) + 1)]
        assert hits.tolist() == [b > a for a, b in zip(counts, counts[1:])], row


def test_the_first_token_of_a_stop_string_alone_does_not_stop(tokenizer):
    """The reference stops on the first token id of each string ("Q" for "Q:"); the text must match."""
    table = build_stop_string_table(tokenizer, ["Q:"])

    def hits(text: str) -> list[bool]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(hits_fn(table.transitions, np.asarray([ids]), np.ones((1, len(ids)), bool)))[0].tolist()

    q, colon = tokenizer.convert_tokens_to_ids(["Q", ":"])
    assert np.asarray(hits_fn(table.transitions, np.asarray([[q, q, 65505, colon, q, colon]]),
                              np.ones((1, 6), bool)))[0].tolist() == [False] * 5 + [True]
    assert not any(hits("Q Question QA Q\n: Q :"))
    ids = tokenizer.encode("So Q: what", add_special_tokens=False)
    colon_at = next(t for t in range(len(ids)) if ":" in tokenizer.decode(ids[:t + 1]))
    assert hits("So Q: what") == [t == colon_at for t in range(len(ids))]


def test_a_stop_string_inside_a_single_token_with_overhang(tokenizer):
    """Tokens that contain the stop string with text on both sides, or that overhang its start or end."""
    by_bytes = {b: i for i, b in enumerate(tokenizer.token_bytes)}
    table = build_stop_string_table(tokenizer, ["\n\n"])
    inside = [i for b, i in by_bytes.items() if b"\n\n" in b and not b.startswith(b"\n") and not b.endswith(b"\n")]
    assert inside, "the vocabulary has tokens with a blank line in the middle"
    word = by_bytes[b"word"]
    for token in inside[:20]:
        got = np.asarray(hits_fn(table.transitions, np.asarray([[word, token, word]]), np.ones((1, 3), bool)))
        assert got[0].tolist() == [False, True, False]
    across = build_stop_string_table(tokenizer, ["swer:"])  # " An|swer" + ":|=": overhang on both sides
    ids = np.asarray([[word, by_bytes[b" Answer"], by_bytes[b":="], word]])
    got = np.asarray(hits_fn(across.transitions, ids, np.ones(ids.shape, bool)))
    assert got[0].tolist() == [False, False, True, False]


def test_masked_tokens_are_skipped_and_the_window_suffices(tokenizer):
    """Left padding or a masked prompt: garbage under the mask neither creates nor breaks a match,
    and a window of `table.window` tokens detects a match that spans it."""
    stop = ["<|im_end|>"]
    table = build_stop_string_table(tokenizer, stop)
    pieces = [tokenizer.token_bytes.index(p.encode()) for p in ["<", "|", "im", "_", "end", "|", ">"]]
    assert table.window == 10 >= len(pieces)
    garbage = tokenizer.encode("<|im_end|><|im_", add_special_tokens=False)
    window = np.asarray([[*garbage[-3:], *pieces]])
    mask = np.asarray([[False] * 3 + [True] * len(pieces)])
    check = jax.jit(ends_with_stop_string)
    assert bool(check(table.transitions, window, mask)[0])
    spliced = np.asarray([[pieces[0], *garbage[-2:], *pieces[1:]]])
    assert bool(check(table.transitions, spliced, np.asarray([[True, False, False] + [True] * 6]))[0])
    assert not bool(check(table.transitions, spliced, np.ones(spliced.shape, bool))[0])
    assert not bool(check(table.transitions, window, np.asarray([[True] * 9 + [False]]))[0])  # last not real


def test_a_window_at_each_position_finds_what_a_full_scan_finds(tokenizer):
    """The per-step check a sampler makes: the `window` tokens ending at the newest position, with
    the prompt masked out, agree with a scan over the generated tokens."""
    stop = ["Q:", "</s>", "<|im_end|>", "\n\n"]
    table = build_stop_string_table(tokenizer, stop)
    rng = np.random.default_rng(9)
    ids = random_rows(rng, tokenizer.token_bytes, stop, 16, 40)
    prompt = rng.integers(0, 12, size=16)  # rows' prompts end at different columns
    generated = np.arange(40)[None, :] >= prompt[:, None]
    want = np.asarray(hits_fn(table.transitions, np.where(generated, ids, 0), generated))
    check = jax.jit(ends_with_stop_string_at, static_argnames="window")
    for t in range(40):
        got = np.asarray(check(table.transitions, ids, generated, t, window=table.window))
        np.testing.assert_array_equal(got, want[:, t])
    per_row = rng.integers(0, 40, size=16)
    np.testing.assert_array_equal(np.asarray(check(table.transitions, ids, generated, per_row, window=table.window)),
                                  want[np.arange(16), per_row])
    assert want.any() and not want.all()


def test_out_of_vocabulary_ids_add_no_text(tokenizer):
    table = build_stop_string_table(tokenizer, ["Q:"])
    q, colon = tokenizer.convert_tokens_to_ids(["Q", ":"])
    ids = np.asarray([[q, 70000, -1, colon]])
    assert np.asarray(hits_fn(table.transitions, ids, np.ones(ids.shape, bool)))[0].tolist() == \
        [False, False, False, True]


def test_advance_carries_the_state_token_by_token(tokenizer):
    stop = ["Q:", "\n\n", "日本"]
    table = build_stop_string_table(tokenizer, stop)
    ids = random_rows(np.random.default_rng(3), tokenizer.token_bytes, stop, 8, 20)
    step = jax.jit(advance)
    state = jnp.zeros(8, jnp.int32)
    carried = []
    for t in range(ids.shape[1]):
        state, hit = step(table.transitions, state, ids[:, t])
        carried.append(np.asarray(hit))
    np.testing.assert_array_equal(np.stack(carried, 1),
                                  np.asarray(hits_fn(table.transitions, ids, np.ones(ids.shape, bool))))


def test_the_cost_is_as_documented(tokenizer):
    table = build_stop_string_table(tokenizer, ["Q:", "</s>", "<|im_end|>", "\n\n"])
    assert table.transitions.shape == (65537, 18) and table.transitions.dtype == np.int32
    assert table.window == 10 and round(table.nbytes / 1e6, 1) == 4.7


def test_the_embedded_arithmetic_tokenizer_works_too():
    from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    table = build_stop_string_table(tokenizer, ["1+", "="])
    ids = np.asarray([tokenizer.encode("21+1=3", add_special_tokens=False)])
    assert np.asarray(hits_fn(table.transitions, ids, np.ones(ids.shape, bool)))[0].tolist() == \
        [False, False, True, False, True, False]


@pytest.mark.parametrize("bad, message", [
    ([""], "stop string 0 is empty"),
    (["Q:", ""], "stop string 1 is empty"),
    ([], "no stop strings given"),
    ("Q:", "a list of strings, got the string 'Q:'"),
    ([b"Q:"], "stop string 0 is a bytes"),
])
def test_bad_stop_strings_are_named(tokenizer, bad, message):
    with pytest.raises(ValueError, match=message):
        build_stop_string_table(tokenizer, bad)
    with pytest.raises(ValueError, match=message):
        cut_at_stop_string("text", bad)


# ---------------------------------------------------------------- host cut

@pytest.mark.parametrize("text, stops, expected", [
    ("The answer is 4.\n\nQ: next", ["Q:", "\n\n"], "The answer is 4."),
    ("no stop here", ["Q:"], "no stop here"),
    ("Q: at the start", ["Q:"], ""),
    ("abcd", ["abcd", "bc"], "a"),          # "bc" ends first: generation stopped there
    ("xabcd", ["bcd", "abcd"], "x"),        # both end at once: the longer one is cut
    ("日本語", ["本"], "日"),
    ("a<|end_turn|>b", ["<|end_turn|>"], "a"),
])
def test_cut_before_the_first_stop_string_to_end(text, stops, expected):
    assert cut_at_stop_string(text, stops) == expected
    found = find_stop_string(text, stops)
    assert (found is None) == (expected == text)


def test_the_cut_text_never_contains_a_stop_string_and_matches_the_device(tokenizer):
    """Decode up to the first hit, cut: the result is free of stop strings and ends where the first
    stop string to complete begins."""
    stop = ["Q:", "</s>", "<|im_end|>", "\n\n"]
    table = build_stop_string_table(tokenizer, stop)
    ids = random_rows(np.random.default_rng(5), tokenizer.token_bytes, stop, 48, 24)
    hits = np.asarray(hits_fn(table.transitions, ids, np.ones(ids.shape, bool)))
    for row, row_hits in zip(ids.tolist(), hits):
        if not row_hits.any():
            continue
        first = int(np.argmax(row_hits))
        text = tokenizer.decode(row[:first + 1], clean_up_tokenization_spaces=False)
        cut = cut_at_stop_string(text, stop)
        assert not any(s in cut for s in stop)
        assert find_stop_string(text, stop)[1] > len(tokenizer.decode(row[:first], clean_up_tokenization_spaces=False))


def test_check_stop_strings_returns_a_tuple():
    assert check_stop_strings(["a", "b"]) == ("a", "b")
