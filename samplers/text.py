"""Text in, text out: prompts and chats through any sampler, with stop strings and streamed text.

    tokenizer = load_tokenizer(folder)
    out = complete(params, tokenizer, ["Q: What is 2 + 3?\\nA:"], config=config, stop_strings=["Q:"],
                   sampler="diffusion", max_new_tokens=64)
    out.texts[0]                         # the completion, cut before the first stop string
    reply = chat(params, tokenizer, [[{"role": "user", "content": "Hi"}]], config=config).texts[0]

A plain prompt is encoded with the tokenizer's special tokens (Huginn's `<|begin_text|>`); a chat
is rendered with the checkpoint's chat template and the generation prompt, and encoded without
adding special tokens again (the template writes `bos_token` itself), exactly as transformers
does. Generation stops at the tokenizer's end tokens (`<|begin_text|>`, `<|end_text|>`,
`<|end_turn|>` and the generation config's), at stop strings (checked on the device as tokens are
generated, see `samplers.common.Stops`), or at `max_new_tokens`. The texts are decoded without
special tokens and cut before the first stop string, as evaluation harnesses expect.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping, Sequence, TextIO

import numpy as np

from huginn_jax.config import HuginnConfig
from huginn_jax.stop_strings import check_stop_strings, cut_at_stop_string
from huginn_jax.text_stream import TextStream
from huginn_jax.tokenizer import Tokenizer, check_fits, check_vocab
from samplers.common import GenerateOutput
from samplers.dispatch import generate

Message = Mapping[str, str]


def end_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that end a generated text: begin/end of text, end of turn, the generation config's."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.end_turn_token_id, *tokenizer.stop_token_ids}
    return sorted(i for i in ids if i is not None)


@dataclasses.dataclass(frozen=True)
class TextOutput:
    """Completions of a batch: `texts` (decoded, cut before a stop string), the `prompts` as given
    to the tokenizer, their `prompt_ids`, and the sampler's `output` (tokens and statistics)."""

    texts: list[str]
    prompts: list[str]
    prompt_ids: list[list[int]]
    output: GenerateOutput


class TextStreamer:
    """A streamer (see `samplers.streaming`) that decodes each sequence's new tokens into text as
    they become final (merging tokens that together make one character) and hands the text of
    row `row` to `write` (default: print to `file` as it comes). `texts` holds every row's text.
    With stop strings, the text ends before the first one."""

    def __init__(self, tokenizer: Tokenizer, *, stop_strings: Sequence[str] = (), row: int | None = 0,
                 file: TextIO | None = None, write: Callable[[int, str], None] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer, self.row = tokenizer, row
        self.stop_strings = tuple(stop_strings)
        self.skip_special_tokens = skip_special_tokens
        self._file = file
        self._write = write
        self.streams: list[TextStream] = []

    @property
    def texts(self) -> list[str]:
        return [stream.text for stream in self.streams]

    def _emit(self, row: int, text: str) -> None:
        if not text:
            return
        if self._write is not None:
            self._write(row, text)
        elif self.row is None or row == self.row:
            out = self._file or sys.stdout
            out.write(text)
            out.flush()

    def __call__(self, new_tokens: list[np.ndarray]) -> None:
        while len(self.streams) < len(new_tokens):
            self.streams.append(TextStream(self.tokenizer, skip_special_tokens=self.skip_special_tokens,
                                           stop_strings=self.stop_strings))
        for row, (stream, tokens) in enumerate(zip(self.streams, new_tokens)):
            if len(tokens):
                self._emit(row, stream.put(tokens))

    def end(self) -> None:
        for row, stream in enumerate(self.streams):
            self._emit(row, stream.flush())


def render_chats(tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]]) -> list[str]:
    """The chat template's text of each conversation, ending with the assistant's generation prompt."""
    if conversations and isinstance(conversations[0], Mapping):
        raise ValueError("chat takes a list of conversations (each a list of messages); wrap a single one in a list")
    return [tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False) for c in conversations]


def complete(params: dict, tokenizer: Tokenizer, prompts: Sequence[str], *, config: HuginnConfig,
             max_new_tokens: int, stop_strings: Sequence[str] = (), sampler: str | None = None,
             streamer: Any = None, add_special_tokens: bool = True, **options: Any) -> TextOutput:
    """Completes plain-text prompts with any sampler (by name, or chosen from the reference's option
    names by `samplers.generate`); `options` are the sampler's."""
    check_vocab(tokenizer, config)
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings (one per sequence), got a single string")
    ids = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} encodes to no tokens; give it some text (or add_special_tokens=True)")
        check_fits(row, config.block_size, what=f"prompt {i}", reserved=max_new_tokens)
    return _run(params, tokenizer, list(prompts), ids, config=config, max_new_tokens=max_new_tokens,
                stop_strings=stop_strings, sampler=sampler, streamer=streamer, **options)


def chat(params: dict, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]], *, config: HuginnConfig,
         max_new_tokens: int, stop_strings: Sequence[str] = (), sampler: str | None = None, streamer: Any = None,
         **options: Any) -> TextOutput:
    """The assistant's next reply in each conversation (a list of {"role", "content"} messages),
    through the chat template; options as in `complete`."""
    check_vocab(tokenizer, config)
    texts = render_chats(tokenizer, conversations)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    for i, row in enumerate(ids):
        check_fits(row, config.block_size, what=f"conversation {i}", reserved=max_new_tokens)
    return _run(params, tokenizer, texts, ids, config=config, max_new_tokens=max_new_tokens,
                stop_strings=stop_strings, sampler=sampler, streamer=streamer, **options)


def _run(params: dict, tokenizer: Tokenizer, prompts: list[str], ids: list[list[int]], *, config: HuginnConfig,
         max_new_tokens: int, stop_strings: Sequence[str], sampler: str | None, streamer: Any,
         **options: Any) -> TextOutput:
    strings = check_stop_strings(stop_strings) if len(stop_strings) else ()
    options.setdefault("stop_token_ids", end_token_ids(tokenizer))
    if strings:
        options.update(stop_strings=strings, tokenizer=tokenizer)
    out = generate(params, ids, config=config, sampler=sampler, max_new_tokens=max_new_tokens, streamer=streamer,
                   **options)
    texts = [cut_at_stop_string(tokenizer.decode(row, skip_special_tokens=True), strings) if strings
             else tokenizer.decode(row, skip_special_tokens=True) for row in out.sequences()]
    return TextOutput(texts=texts, prompts=prompts, prompt_ids=ids, output=out)


def summary_line(out: GenerateOutput, row: int, seconds: float, decode_seconds: float | None) -> str:
    """One line on row `row` of a generation: tokens, time and tokens/s (after the first token,
    when `decode_seconds` is known: compilation and prefill aside), sequential core steps and core
    position-steps per token, and the KV cache's memory when the sampler reports it."""
    tokens = int(out.lengths[row])
    parts = [f"{tokens} tokens in {seconds:.2f} s"]
    if decode_seconds and tokens > 1:
        parts.append(f"{(tokens - 1) / decode_seconds:.1f} tokens/s after the first")
    elif seconds > 0:
        parts.append(f"{tokens / seconds:.1f} tokens/s")
    per_token = max(tokens, 1)
    stats = out.stats
    if "sequential_core_steps" in stats:
        parts.append(f"{float(stats['sequential_core_steps'][row]) / per_token:.1f} sequential core steps per token")
        parts.append(f"{float(stats['core_position_steps'][row]) / per_token:.1f} core position-steps per token")
    if "cache_memory_mb" in stats:
        filled = np.asarray(stats["cache_memory_mb"], np.float64).reshape(-1)
        allocated = np.asarray(stats["cache_allocated_mb"], np.float64).reshape(-1)
        parts.append(f"KV cache {filled[min(row, filled.size - 1)]:.2f} MiB filled of "
                     f"{allocated[min(row, allocated.size - 1)]:.2f} MiB allocated")
    return ", ".join(parts)
