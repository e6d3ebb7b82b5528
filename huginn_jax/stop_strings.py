"""Stop strings, checked on the device while generating, and cut from decoded text on the host.

A sequence stops at the first token whose text completes one of the stop strings, wherever the
string starts: inside that token, or tokens earlier (["Q", ":"], ["\\nQ", ":\\n"]), with overhang
on both sides (" Q:" + "\\n"). One string's text is never confused with a single token of it: the
reference's approach (stop on the first token id of each string) stops on any "Q" when asked for
"Q:"; this module matches the text.

How: matching runs on bytes. `token_bytes` maps every id to the bytes it adds to decoded text
(byte-level BPE tokens may hold part of a UTF-8 character; special tokens add their text). The stop
strings' UTF-8 bytes are compiled into an Aho-Corasick automaton (a DFA over bytes whose state is
the longest suffix of the text read so far that begins some stop string). Running each token's
bytes through it from every state gives one table over the vocabulary,

    transitions[token, state] = 2 * (state after the token's bytes) + (a stop string ended inside them)

so that reading a token is one table lookup, on the device, with no host round trip. The bytes of
a token are the same whatever precedes it, so the state after a window of tokens, started from the
empty state at the window's first token, finds every stop string that starts in the window.

Cost: the table has (V + 1) x Q int32 entries, V the tokenizer's ids (+1: an identity row for ids
outside the tokenizer) and Q the automaton's states (at most 1 + the total bytes of the stop
strings); for Huginn-0125 (V = 65536) and ["Q:", "</s>", "<|im_end|>", "\\n\\n"] (Q = 18) that is
4.7 MB. Checking the token at one position (`ends_with_stop_string`, or `ends_with_stop_string_at`
for a position of a whole buffer) reads the last `window` tokens (the longest stop string in bytes:
each token of the tokenizer adds at least one byte, so an occurrence that ends in the last token
starts in the window; ids outside the tokenizer add none) and does `window` dependent lookups of
one int32 per row: for a batch of B rows, B x window gathers and no arithmetic to speak of,
negligible beside a forward pass. A sampler that keeps the automaton's state per row can instead
use `advance` (one lookup per row per new token); `stop_string_hits` scans whole sequences (e.g. a
diffusion block) at once.
Building the table on the host is vectorised over the vocabulary with numpy: 0.2 s for the strings
above, 0.8 s with a 64-byte string added (Q = 82), on one CPU core.

Text view: the device matches the raw decoded bytes (`decode(..., clean_up_tokenization_spaces=False)`
with special tokens as their text; only the generated tokens, when the prompt is masked out). The
host side (`find_stop_string`, `cut_at_stop_string`) works on any string: it cuts before the stop
string that ends first (the one the device stopped on), so the text returned never contains a stop
string. On a cleaned-up decode (Hugging Face's default " ." -> ".") a stop string that starts with
a space before punctuation can differ between the two views.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StopStringTable:
    """The precomputed automaton of some stop strings over a tokenizer's vocabulary (numpy, host)."""

    strings: tuple[str, ...]
    transitions: np.ndarray  # [V + 1, Q] int32: 2 * next state + hit; row V is the identity (no bytes)
    window: int              # tokens a window check needs: the longest stop string, in bytes

    @property
    def num_states(self) -> int:
        return self.transitions.shape[1]

    @property
    def nbytes(self) -> int:
        return self.transitions.nbytes


def check_stop_strings(stop_strings: Sequence[str]) -> tuple[str, ...]:
    """The stop strings as a tuple; raises ValueError for an empty string, a non-string, or none at all."""
    if isinstance(stop_strings, str):
        raise ValueError(f"stop strings are a list of strings, got the string {stop_strings!r}")
    strings = tuple(stop_strings)
    if not strings:
        raise ValueError("no stop strings given")
    for i, s in enumerate(strings):
        if not isinstance(s, str):
            raise ValueError(f"stop string {i} is a {type(s).__name__}, not a string: {s!r}")
        if not s:
            raise ValueError(f"stop string {i} is empty; an empty stop string would stop before any text")
    return strings


def _automaton(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Aho-Corasick over bytes: (delta [Q, 256] int32, ends [Q] bool: some pattern ends at this state)."""
    children: list[dict[int, int]] = [{}]
    terminal = [False]
    for pattern in patterns:
        node = 0
        for b in pattern:
            if b not in children[node]:
                children[node][b] = len(children)
                children.append({})
                terminal.append(False)
            node = children[node][b]
        terminal[node] = True
    q = len(children)
    delta = np.zeros((q, 256), np.int32)
    ends = np.asarray(terminal)
    fail = np.zeros(q, np.int32)
    order = [0]
    for u in order:  # breadth first: a node's failure link is shallower, so already complete
        if u:
            delta[u] = delta[fail[u]]
        for b, v in children[u].items():
            fail[v] = delta[fail[u], b] if u else 0
            ends[v] |= ends[fail[v]]
            order.append(v)
        for b, v in children[u].items():
            delta[u, b] = v
    return delta, ends


def build_stop_string_table(tokenizer: Any, stop_strings: Sequence[str]) -> StopStringTable:
    """The device table for `stop_strings` over `tokenizer`'s vocabulary (`tokenizer.token_bytes`:
    see `huginn_jax.tokenizer.Tokenizer`)."""
    strings = check_stop_strings(stop_strings)
    patterns = [s.encode("utf-8") for s in strings]
    delta, ends = _automaton(patterns)
    token_bytes = tokenizer.token_bytes
    v, q = len(token_bytes), delta.shape[0]
    lengths = np.fromiter((len(b) for b in token_bytes), np.int64, count=v)
    order = np.argsort(-lengths, kind="stable")  # longest first: step j touches a prefix of the rows
    width = int(lengths.max(initial=0))
    padded = np.zeros((v, max(width, 1)), np.uint8)
    for row, i in enumerate(order):
        padded[row, :lengths[i]] = np.frombuffer(token_bytes[i], np.uint8)
    state = np.broadcast_to(np.arange(q, dtype=np.int32), (v, q)).copy()  # [V sorted, Q]
    hit = np.zeros((v, q), bool)
    sorted_lengths = lengths[order]
    for j in range(width):
        n = int(np.count_nonzero(sorted_lengths > j))  # the rows whose token is longer than j
        state[:n] = delta[state[:n], padded[:n, j, None]]
        hit[:n] |= ends[state[:n]]
    transitions = np.empty((v + 1, q), np.int32)
    transitions[order] = 2 * state + hit
    transitions[v] = 2 * np.arange(q, dtype=np.int32)
    return StopStringTable(strings, transitions, max(len(p) for p in patterns))


# ---------------------------------------------------------------- on the device (pure, jittable)

def _table_rows(transitions: Array, ids: Array) -> Array:
    """Token ids -> table rows; ids outside the tokenizer (negative, or a padded model vocabulary)
    read the identity row."""
    vocab = transitions.shape[0] - 1
    return jnp.where((ids >= 0) & (ids < vocab), ids, vocab)


def advance(transitions: Array, state: Array, ids: Array) -> tuple[Array, Array]:
    """Reads one token per row: (new state [B] int32, hit [B] bool: a stop string ended inside it).

    state [B] int32 (0 before any text), ids [B] int.
    """
    packed = jnp.asarray(transitions)[_table_rows(transitions, ids), state]
    return packed >> 1, (packed & 1).astype(bool)


def stop_string_hits(transitions: Array, ids: Array, mask: Array) -> Array:
    """hits [B, T] bool: a stop string ends inside the token at [b, t], counting only text of the
    tokens where `mask` [B, T] is true (others, e.g. prompt or padding, are skipped) from the first
    column on. ids [B, T] int."""
    transitions = jnp.asarray(transitions)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask, bool)

    def read(state: Array, column: tuple[Array, Array]) -> tuple[Array, Array]:
        token, real = column
        new_state, hit = advance(transitions, state, token)
        return jnp.where(real, new_state, state), hit & real

    start = jnp.zeros(ids.shape[:1], jnp.int32)
    _, hits = jax.lax.scan(read, start, (ids.T, mask.T))  # [T, B]
    return hits.T


def ends_with_stop_string(transitions: Array, ids: Array, mask: Array) -> Array:
    """[B] bool: the text of the real tokens of each row's window contains a stop string that ends
    inside the last token. ids, mask [B, L] (L >= the table's `window` for a complete check; the
    last column must be real for a hit). Checking every new position once finds the first stop."""
    return stop_string_hits(transitions, ids, mask)[:, -1]


def ends_with_stop_string_at(transitions: Array, ids: Array, mask: Array, position: Array | int,
                             window: int) -> Array:
    """[B] bool: `ends_with_stop_string` on the `window` tokens of each row that end at `position`
    (an int or [B] ints) of ids, mask [B, T]; columns before 0 count as not real. `window` (static:
    the table's `window`) fixes the shape, so a sampler's loop compiles once."""
    ids, mask = jnp.asarray(ids), jnp.asarray(mask, bool)
    position = jnp.broadcast_to(jnp.asarray(position, jnp.int32), ids.shape[:1])
    columns = position[:, None] + jnp.arange(1 - window, 1, dtype=jnp.int32)  # [B, window]
    inside = columns >= 0
    columns = jnp.clip(columns, 0, ids.shape[1] - 1)
    window_ids = jnp.take_along_axis(ids, columns, axis=1)
    window_mask = jnp.take_along_axis(mask, columns, axis=1) & inside
    return ends_with_stop_string(transitions, window_ids, window_mask)


# ---------------------------------------------------------------- on the host

def find_stop_string(text: str, stop_strings: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the stop string occurrence in `text` that ends first (the longest of those
    ending there), or None."""
    best: tuple[int, int] | None = None
    for s in check_stop_strings(stop_strings):
        start = text.find(s)
        if start >= 0 and (best is None or (start + len(s), start) < (best[1], best[0])):
            best = (start, start + len(s))
    return best


def cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) the first stop string to end in it; all of it if none does."""
    found = find_stop_string(text, stop_strings)
    return text if found is None else text[:found[0]]
