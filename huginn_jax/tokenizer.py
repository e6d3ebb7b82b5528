"""The tokenizer of a checkpoint folder, with Hugging Face's method names and results.

`load_tokenizer(folder)` reads what a Hugging Face checkpoint (or one converted by `convert`, which
copies the same files) carries next to its weights:

    tokenizer.json            the `tokenizers` pipeline (required): byte-level BPE for Huginn-0125
    tokenizer_config.json     bos/eos/pad tokens, `chat_template`, `clean_up_tokenization_spaces`
    special_tokens_map.json   bos/eos/pad tokens (when tokenizer_config.json lacks them)
    chat_template.jinja       a chat template that takes priority over tokenizer_config.json's
    generation_config.json    the ids that end generation (`eos_token_id`, an id or a list)

and returns a `Tokenizer` whose `encode`, `decode`, `batch_decode`, `apply_chat_template`,
`convert_ids_to_tokens`, special-token ids, `vocab_size` and `len()` give exactly what
`transformers.AutoTokenizer.from_pretrained(folder)` gives on the same files (tests/test_tokenizer.py
checks this case by case). Encoding and decoding are the `tokenizers` library's; chat templates are
rendered by `jinja2` in the environment transformers uses (sandboxed, `trim_blocks`,
`lstrip_blocks`, `loopcontrols`, its `tojson`, `raise_exception`, `strftime_now`, and its
`{% generation %}` block, which only marks the assistant's text and renders it unchanged).

Two behaviours of Hugging Face that surprise: Huginn's post-processor prepends `<|begin_text|>`
when special tokens are added, and its chat template writes `bos_token` itself, so a rendered chat
is tokenized without adding special tokens (as transformers does); and `decode` applies
`clean_up_tokenization_spaces` (on for Huginn-0125: " ." becomes ".", " n't" becomes "n't"), so
decoding is not the exact inverse of encoding unless `clean_up_tokenization_spaces=False`.

A folder with only a tokenizer.json (the embedded arithmetic model) gets its bos/eos/pad tokens
from Huginn's names (`<|begin_text|>`, `<|end_text|>`, `<|pad|>`) when its vocabulary has them.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                            "mask_token")
"""The named special tokens of Hugging Face tokenizers (passed to chat templates by these names)."""
HUGINN_SPECIAL_TOKENS = {"bos_token": "<|begin_text|>", "eos_token": "<|end_text|>", "pad_token": "<|pad|>"}
"""Huginn's names, used for a folder that has only a tokenizer.json."""
END_TURN_TOKEN = "<|end_turn|>"
"""Ends an assistant turn in Huginn's chat template (`<|end_text|>`, the eos token, ends a text)."""
KNOWN_ROLES = ("system", "user", "assistant", "Huginn")
"""Roles a chat message may have: Huginn's template writes `assistant` (and `Huginn`) as `Huginn`."""


class TokenizerError(ValueError):
    """A tokenizer folder, chat, or text that cannot be used, named in the message."""


# ---------------------------------------------------------------- chat templates (as transformers)

class GenerationBlock(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag, which marks the assistant's text.

    transformers uses it to find the assistant's tokens (`return_assistant_tokens_mask`); when that
    is not asked for, the block renders its body unchanged, which is all that is needed here.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` (Jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """A jinja2 template in transformers' chat-template environment (compiled once per text)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def check_messages(conversation: Any, roles: Sequence[str] = KNOWN_ROLES) -> None:
    """Raises `TokenizerError` unless `conversation` is a list of {"role": str, "content": str}
    whose roles are in `roles`."""
    if isinstance(conversation, (str, bytes, Mapping)) or not isinstance(conversation, Sequence):
        raise TokenizerError(f"a conversation is a list of messages, got {type(conversation).__name__}")
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if role not in roles:
            raise TokenizerError(f"message {i} has the unknown role {role!r}; known roles: {', '.join(roles)}")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i} ({role}) has content of type {type(content).__name__}; "
                                 "content must be a string")


# ---------------------------------------------------------------- the tokenizer

def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(ids: Any) -> list[int]:
    """Token ids from an int, a list, or a numpy / JAX array (1-D)."""
    array = np.asarray(ids)
    if array.ndim > 1:
        raise TokenizerError(f"expected one sequence of token ids, got an array of shape {array.shape}")
    return [int(i) for i in array.reshape(-1)]


class Tokenizer:
    """A `tokenizers.Tokenizer` with Hugging Face's special tokens, chat template and generation stops.

    Use `load_tokenizer(folder)`; treat it as read-only (it caches `token_bytes`).
    """

    def __init__(self, backend: Any, *, source: str, special_tokens: Mapping[str, str],
                 chat_template: str | None = None, chat_template_source: str | None = None,
                 clean_up_tokenization_spaces: bool = False,
                 generation_config: Mapping[str, Any] | None = None) -> None:
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.generation_config = dict(generation_config or {})
        self.special_tokens_map: dict[str, str] = {}
        for name, token in special_tokens.items():
            if backend.token_to_id(token) is None:
                raise TokenizerError(f"{source}: the {name} {token!r} is not in the vocabulary of {TOKENIZER_FILE}")
            self.special_tokens_map[name] = token

    # ---- special tokens
    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens (bos, eos, pad, ...), as transformers lists them."""
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.all_special_tokens]

    @property
    def end_turn_token_id(self) -> int | None:
        """`<|end_turn|>`, which ends an assistant turn of Huginn's chat template (None if absent)."""
        return self.backend.token_to_id(END_TURN_TOKEN)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids that end generation: generation_config.json's `eos_token_id` (an id or a list),
        else the eos token. (Huginn-0125's lists only `<|end_text|>`; a chat reply ends with
        `end_turn_token_id`, which the reference also stops on.)"""
        eos = self.generation_config.get("eos_token_id", self.eos_token_id)
        if eos is None:
            return ()
        return tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))

    # ---- vocabulary
    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (transformers' `vocab_size`: without added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary with added tokens (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_id(self) -> int:
        return max(self.backend.get_vocab(with_added_tokens=True).values())

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        """The vocabulary entry of each id (byte-level symbols such as 'Ġ' for a space, as stored)."""
        if isinstance(ids, (int, np.integer)):
            return self.backend.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(i) for i in _ids(ids) if i not in special]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    # ---- text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (Huginn: `<|begin_text|>` first when `add_special_tokens`)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of token ids (an id, a list, or a 1-D array). Bytes that do not form UTF-8 become
        U+FFFD. `clean_up_tokenization_spaces` defaults to the folder's setting, as in transformers."""
        text = self.backend.decode(_ids(ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences: Iterable[Any], skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

    @functools.cached_property
    def token_bytes(self) -> tuple[bytes, ...]:
        """The bytes each id contributes to decoded text (index = id; b"" for unused ids).

        `decode(ids, clean_up_tokenization_spaces=False)` is
        `b"".join(token_bytes[i] for i in ids).decode("utf-8", "replace")`. A byte-level BPE token
        may hold part of a UTF-8 character; special tokens contribute their text.
        """
        return _token_bytes(self.backend, self.source)

    # ---- chat
    def apply_chat_template(self, conversation: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True, chat_template: str | None = None,
                            **kwargs: Any) -> list[int] | str:
        """A conversation rendered with the chat template: its token ids, or its text (`tokenize=False`).

        `conversation` is a list of {"role", "content"} messages (roles: `KNOWN_ROLES`; content: a
        string). `add_generation_prompt` ends the text with the header of an assistant turn, so the
        model answers next. The template writes the bos token itself, so the text is tokenized
        without adding special tokens (as transformers does). Further keyword arguments reach the
        template, as in transformers; `chat_template` replaces the folder's template.
        """
        check_messages(conversation)
        template, source = (chat_template, "the chat_template argument") if chat_template is not None \
            else (self.chat_template, self.chat_template_source)
        if template is None:
            raise TokenizerError(f"{self.source} has no chat template (neither {CHAT_TEMPLATE_FILE} nor a "
                                 f"chat_template in {TOKENIZER_CONFIG_FILE})")
        variables = {**self.special_tokens_map, **kwargs}
        try:
            text = compile_chat_template(template).render(
                messages=conversation, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **variables)
        except Exception as err:  # jinja2's TemplateError, or an error a filter raised
            raise TokenizerError(f"the chat template in {source} failed to render: "
                                 f"{type(err).__name__}: {err}") from err
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab={len(self)}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drops the space before . ? ! , and English contractions."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level map (character -> byte) that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _decoder_kinds(decoder: Mapping[str, Any] | None) -> list[str]:
    if decoder is None:
        return ["none (tokens are joined with spaces)"]
    if decoder.get("type") == "Sequence":
        return [kind for d in decoder.get("decoders", []) for kind in _decoder_kinds(d)]
    return [decoder.get("type", "")]


def _token_bytes(backend: Any, source: str) -> tuple[bytes, ...]:
    """Per id, its bytes in decoded text, for a ByteLevel decoder or a Fuse decoder (tokens joined as
    they are). tokenizers passes special tokens through the decoder too."""
    kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder"))
    if kinds not in (["Fuse"], ["ByteLevel"]):
        raise TokenizerError(f"{source}: a byte view of tokens (for stop strings) needs a ByteLevel or Fuse "
                             f"decoder; this tokenizer's decoder is {' + '.join(kinds)}")
    byte_of = _byte_level_alphabet()
    vocab = backend.get_vocab(with_added_tokens=True)
    out = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if kinds == ["ByteLevel"] and all(c in byte_of for c in token):
            out[i] = bytes(byte_of[c] for c in token)
        else:  # as tokenizers' ByteLevel decoder: a token with a symbol outside the alphabet is UTF-8
            out[i] = token.encode()
    return tuple(out)


def _chat_template(folder: Path, config: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(template, the file it came from): chat_template.jinja first, then tokenizer_config.json."""
    jinja_path = folder / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    template = config.get("chat_template")
    where = str(folder / TOKENIZER_CONFIG_FILE)
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if "default" not in named:
            raise TokenizerError(f"{where}: chat_template lists {sorted(named)} but no 'default'")
        return named["default"], f"{where} (chat_template 'default')"
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{where}: chat_template must be a string, got {type(template).__name__}")
    return template, (f"{where} (chat_template)" if template is not None else None)


def load_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a Hugging Face, converted, or embedded checkpoint folder (see the module doc)."""
    from tokenizers import Tokenizer as BackendTokenizer

    folder = Path(folder)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        what = "is not a folder" if not folder.is_dir() else f"has no {TOKENIZER_FILE}"
        raise TokenizerError(f"{folder} {what}; a tokenizer folder needs {TOKENIZER_FILE} "
                             f"(the converter copies it from the source checkpoint)")
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as err:
        raise TokenizerError(f"cannot read {path}: {err}") from err

    config = _read_json(folder / TOKENIZER_CONFIG_FILE) if (folder / TOKENIZER_CONFIG_FILE).is_file() else {}
    special_map = _read_json(folder / SPECIAL_TOKENS_MAP_FILE) if (folder / SPECIAL_TOKENS_MAP_FILE).is_file() else {}
    special: dict[str, str] = {}
    for name in SPECIAL_TOKEN_ATTRIBUTES:
        token = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if token is not None:
            special[name] = token
    if not config and not special_map:
        special = {name: t for name, t in HUGINN_SPECIAL_TOKENS.items() if backend.token_to_id(t) is not None}

    generation = folder / GENERATION_CONFIG_FILE
    template, template_source = _chat_template(folder, config)
    return Tokenizer(backend, source=str(folder), special_tokens=special, chat_template=template,
                     chat_template_source=template_source,
                     clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
                     generation_config=_read_json(generation) if generation.is_file() else None)


# ---------------------------------------------------------------- checks the samplers need

def check_fits(ids: Sequence[int] | int, context: int, what: str = "the prompt", reserved: int = 0,
               reserved_what: str = "new tokens") -> None:
    """Raises `TokenizerError` if `ids` (or a token count) plus `reserved` tokens exceed `context`."""
    n = ids if isinstance(ids, (int, np.integer)) else len(ids)
    if n + reserved > context:
        extra = f" plus {reserved} {reserved_what} ({n + reserved})" if reserved else ""
        raise TokenizerError(f"{what} has {n} tokens{extra}, more than the model's context of {context} tokens")


def check_vocab(tokenizer: Tokenizer, config: Any) -> None:
    """Raises `TokenizerError` if the model (`config.vocab_size`) has fewer ids than the tokenizer uses."""
    needed = tokenizer.max_token_id + 1
    if config.vocab_size < needed:
        raise TokenizerError(f"the model's vocabulary (vocab_size={config.vocab_size}) is smaller than its "
                             f"tokenizer's ({needed} ids in {Path(tokenizer.source) / TOKENIZER_FILE}); "
                             "the tokenizer does not belong to this model")
