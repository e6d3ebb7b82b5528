"""Incremental detokenization: the text of a sequence, piece by piece, as its tokens become final.

`TextStream` takes the newly final token ids of one sequence (`put`) and returns the text they
complete; `flush` returns the rest when the sequence ends. The pieces add up exactly to
`tokenizer.decode(all ids)` (with the same `skip_special_tokens` and `clean_up_tokenization_spaces`),
cut before the first stop string when stop strings are given. What is held back, and why:

- bytes of an unfinished UTF-8 character (a byte-level BPE token can carry part of one, and decoding
  it alone gives U+FFFD). As Hugging Face's streamers do, a piece is released only when the decoded
  text does not end in U+FFFD; the text of the last released tokens is decoded again with the new
  ones, so a decoder that treats the first token specially is handled too.
- with `clean_up_tokenization_spaces` (on for Huginn-0125, as in transformers' `decode`), text from a
  space within the last three characters on: " ." may still become ".", " n't" "n't".
- with stop strings, the end of the text that could begin one ("Q" for "Q:"); once a stop string is
  complete the stream ends just before it (`stopped`), and later tokens are ignored.

One `TextStream` per sequence (a batch keeps one per row); a stream is a small host object, fed
from the sampler's host loop or callback.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from huginn_jax.stop_strings import check_stop_strings, find_stop_string
from huginn_jax.tokenizer import clean_up_tokenization

REPLACEMENT_CHARACTER = "\ufffd"
CLEAN_UP_REACH = 3
"""Characters after a space that transformers' clean-up can still change (its patterns are at most
4 characters long and each begins with a space)."""


class TextStream:
    """The text of one sequence as its tokens arrive. See the module docstring."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = False,
                 clean_up_tokenization_spaces: bool | None = None, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.clean_up = tokenizer.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else bool(clean_up_tokenization_spaces)
        self.stop_strings = check_stop_strings(stop_strings) if len(stop_strings) else ()
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[prefix:read]: context for the next decode; ids[read:]: not yet read
        self._raw = ""                 # decoded text of ids[:read] (complete characters, no clean-up)
        self._cleaned_upto = 0         # raw[:cleaned_upto] is in `_clean`
        self._clean = ""               # clean_up(raw[:cleaned_upto]): final text
        self.text = ""                 # what has been returned: a prefix of `_clean`
        self.stopped = False

    def put(self, ids: Iterable[int] | int) -> str:
        """Newly final token ids -> the text that can be shown now (often "", never taken back)."""
        if self.stopped:
            return ""
        self.ids += [int(i) for i in np.asarray(ids).reshape(-1)]
        self._read_complete_text(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text at the end of the sequence (an unfinished character as U+FFFD)."""
        if self.stopped:
            return ""
        self._read_complete_text(final=True)
        return self._release(final=True)

    # ---- stages
    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _read_complete_text(self, final: bool) -> None:
        """Appends the text of the unread ids to `_raw` if it ends with a complete character (or `final`)."""
        context = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self.ids))
        if final or (len(text) > len(context) and not text.endswith(REPLACEMENT_CHARACTER)):
            self._raw += text[len(context):]
            self._prefix, self._read = self._read, len(self.ids)

    def _release(self, final: bool) -> str:
        raw = self._raw
        end = len(raw)
        if self.clean_up and not final:
            # cut where no clean-up pattern can span: no space among the 3 characters before the cut
            while end > self._cleaned_upto and " " in raw[max(0, end - CLEAN_UP_REACH):end]:
                end -= 1
        if end > self._cleaned_upto:
            piece = raw[self._cleaned_upto:end]
            self._clean += clean_up_tokenization(piece) if self.clean_up else piece
            self._cleaned_upto = end
        return self._emit(final)

    def _emit(self, final: bool) -> str:
        """Returns `_clean` beyond `text`, up to a stop string or the start of a possible one."""
        clean, released = self._clean, len(self.text)
        upto = len(clean)
        if self.stop_strings:
            longest = max(len(s) for s in self.stop_strings)
            look_from = max(0, released - longest + 1)
            found = find_stop_string(clean[look_from:], self.stop_strings)
            if found is not None:
                upto = max(released, look_from + found[0])
                self.stopped = True
            elif not final:
                upto = next((i for i in range(max(released, len(clean) - longest + 1), len(clean))
                             if any(s.startswith(clean[i:]) for s in self.stop_strings)), len(clean))
        piece = clean[released:upto]
        self.text += piece
        return piece

