"""An lm-evaluation-harness model for huginn-jax checkpoints, registered as `huginn-jax`.

    python -m experiments.lm_eval --model huginn-jax \\
        --model_args pretrained=ckpt/huginn-0125,num_steps=32,dtype=bfloat16 --batch_size 8 \\
        --tasks gsm8k_cot --gen_kwargs sampler=diffusion,inner_recurrence=4,state_noise_mixing=0

(importing this module registers the class; `experiments.lm_eval` runs lm-eval's own command line
with it). Model arguments: `pretrained` (a converted or Hugging Face layout folder with its
tokenizer), `num_steps` (r of the forward pass and the samplers' default), `dtype`,
`max_length` (default: the model's context), `max_gen_toks` (default 256, lm-eval's), `seed`,
`sampler` (the default sampler of `generate_until`), `add_bos_token` (as HFLM's); the batch size
is lm-eval's own `--batch_size` (a fixed number; lm-eval passes it to the model).

- `generate_until`: batched (similar lengths together, the batch padded to `batch_size` with copies
  of its first request so that batches share compiled programs), any sampler, chosen by `sampler=`
  (`ar`, `adaptive`, `speculative`, `diffusion`, a reference name, or a row of Table 1 such as
  `diffusion-main`, which brings the row's settings) or by the reference's option names in
  `gen_kwargs` (`inner_recurrence=4` selects the diffusion sampler; adaptive exits get the
  `latest-m4` cache unless `cache_lookup_strategy` says otherwise), with lm-eval's
  sampling options (`do_sample`, `temperature`, `top_p`, `top_k`; temperature 0 is greedy). It
  stops at the `until` strings (on the device) and the tokenizer's end tokens, after at most
  `max_gen_toks` tokens; the text is cut before the first stop string, as HFLM does. Each request
  draws from `fold_in(key(seed), its index)`, so results do not depend on the batching.
- `loglikelihood`, `loglikelihood_rolling`: from the forward pass at `num_steps`
  (`huginn_jax.model.forward`), log-softmax in float32, sums in float64; batches padded to
  `batch_size` rows and a power-of-two length (at least 16, at most `max_length`), so few shapes
  compile. The initial state of a position depends only on the seed and the position (as in the
  samplers' prefill), so padding and batching change nothing. Tokenization, truncation and the
  rolling windows are HFLM's (a text that starts with the bos token is encoded without special
  tokens; Huginn's tokenizer prepends `<|begin_text|>` to any other).
- the chat template: `apply_chat_template` renders the checkpoint's template as HFLM does
  (generation prompt, or continuing a final assistant message), retrying without the system
  message if the template fails; `tokenizer_name` and `chat_template` name it for lm-eval's caches.

Single process: lm-eval's own data parallelism (accelerate) does not apply to this backend.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from huginn_jax.config import HuginnConfig
from huginn_jax.model import forward
from huginn_jax.tasks.base import chat_prompt_text
from huginn_jax.tokenizer import TokenizerError
from samplers.common import random_state
from samplers.dispatch import sampler_name, with_sampling
from samplers.evaluation import Model, base_options, length_batches, request_keys, sampler_defaults
from samplers.sampling import GREEDY
from samplers.text import complete

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
"""The project's own lm-eval tasks (`huginn_arithmetic`), for --include_path / TaskManager."""

MIN_SCORE_LENGTH = 16  # the shortest padded length of a loglikelihood batch


def score_length(length: int, max_length: int) -> int:
    """The padded length of a loglikelihood batch whose longest input has `length` tokens."""
    padded = MIN_SCORE_LENGTH
    while padded < length:
        padded *= 2
    return max(min(padded, max_length), length)


@functools.partial(jax.jit, static_argnames=("width", "config"))
def _initial_states(keys: jax.Array, width: int, init_scale: jax.Array, wte: jax.Array, *,
                    config: HuginnConfig) -> jax.Array:
    """The random initial states [B, W, E] of positions 0..W-1, each from its row's key and its
    position only (the samplers' prefill draws the same)."""
    positions = jnp.broadcast_to(jnp.arange(width), (keys.shape[0], width))
    return random_state(config, keys, positions, init_scale, wte.dtype)


@jax.jit
def _target_scores(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log-probability [B, T] of each target, whether it is the argmax [B, T]) from logits [B, T, V]."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets


def _integer(name: str, value: Any, minimum: int) -> int:
    """A model argument that must be an integer >= minimum (lm-eval passes ints, or the text)."""
    try:
        number = int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
            else int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"huginn-jax model argument {name}={value!r} must be an integer >= {minimum}")
    return number


def generation_keys(seed: int, requests: Sequence[Any]) -> jax.Array:
    """One key per request [N]: `fold_in(key(seed), doc_id)` (the evaluation runner's key for the
    same document), folded once more with k for the k-th repeat of a (task, document) request;
    a request without a doc_id uses its position."""
    occurrences: dict[tuple[Any, Any], int] = {}
    bases, repeats = [], []
    for position, request in enumerate(requests):
        doc_id = getattr(request, "doc_id", None)
        base = position if doc_id is None else int(doc_id)
        name = (getattr(request, "task_name", None), base)
        repeats.append(occurrences.get(name, 0))
        occurrences[name] = repeats[-1] + 1
        bases.append(base)
    keys = request_keys(seed, bases)
    again = jax.vmap(jax.random.fold_in)(keys, np.asarray(repeats, np.uint32))
    later = (np.asarray(repeats) > 0)[:, None]
    data = np.where(later, np.asarray(jax.random.key_data(again)), np.asarray(jax.random.key_data(keys)))
    return jax.random.wrap_key_data(jnp.asarray(data))


@register_model("huginn-jax")
class HuginnJaxLM(TemplateLM):
    """lm-eval's model interface over a huginn-jax checkpoint (see the module docstring)."""

    def __init__(self, pretrained: str | None = None, num_steps: int = 32, dtype: str | None = None,
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 0, sampler: str | None = None, add_bos_token: bool | None = None,
                 init_scale: float = 1.0, device: str | None = None, max_batch_size: int | None = None,
                 model: Model | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"huginn-jax does not take the model argument(s) {sorted(unknown)}; it takes "
                             "pretrained, num_steps, dtype, batch_size, max_length, max_gen_toks, seed, sampler, "
                             "add_bos_token, init_scale")
        if model is None:
            if pretrained is None:
                raise ValueError("huginn-jax needs model_args pretrained=FOLDER (a converted or Hugging Face "
                                 "layout checkpoint with its tokenizer)")
            model = Model.load(pretrained, dtype)
        if str(batch_size).startswith("auto"):
            raise ValueError("huginn-jax takes a fixed batch size (--batch_size=N): batches are padded to it so "
                             "that they share compiled programs")
        self.model = model
        self.tokenizer = model.tokenizer
        self.num_steps = _integer("num_steps", num_steps, 0)
        self.batch_size = _integer("batch_size", batch_size, 1)
        self._max_length = None if max_length is None else _integer("max_length", max_length, 2)
        self._max_gen_toks = _integer("max_gen_toks", max_gen_toks, 1)
        self.seed = _integer("seed", seed, 0)
        self.sampler = sampler
        self.add_bos_token = add_bos_token
        self.init_scale = float(init_scale)
        if device is not None:
            log.info("huginn-jax runs on JAX's default device (%s); device=%s is not used",
                     jax.devices()[0].platform, device)

    # ---- what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.config.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return os.path.abspath(self.tokenizer.source).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """HFLM's rule: explicit `add_special_tokens`, else `add_bos_token`, else the tokenizer's
        default, except that a text starting with the bos token gets no special tokens."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = False if bos and string.startswith(bos) else \
                (True if self.add_bos_token is None else bool(self.add_bos_token))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self._render_chat(chat_history, add_generation_prompt)
        except TokenizerError:
            log.warning("the chat template failed; retrying without the system message (as lm-eval's HFLM)")
            return self._render_chat([m for m in chat_history if m["role"] != "system"], add_generation_prompt)

    def _render_chat(self, chat_history: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if add_generation_prompt:
            return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=True, tokenize=False)
        return chat_prompt_text(chat_history, self.tokenizer.apply_chat_template)  # continue the final message

    # ---- scoring
    def score_tokens(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per input (ids [L]) and targets [L] (the next token at each position): the float32
        log-probability of each target at `num_steps`, and whether it is the argmax. Batched."""
        config, params = self.model.config, self.model.params
        scores: list[Any] = [None] * len(inputs)
        greedy: list[Any] = [None] * len(inputs)
        keys = request_keys(self.seed, [0] * self.batch_size)  # one key for every row: states by position
        for batch in length_batches([len(i) for i in inputs], self.batch_size):
            width = score_length(max(len(inputs[i]) for i in batch), self.max_length)
            ids = np.zeros((self.batch_size, width), np.int32)
            target = np.zeros((self.batch_size, width), np.int32)
            for row, i in enumerate(batch):
                ids[row, : len(inputs[i])] = inputs[i]
                target[row, : len(targets[i])] = targets[i]
            states = _initial_states(keys, width, jnp.float32(self.init_scale), params["wte"], config=config)
            out = forward(params, ids, self.num_steps, config=config, input_states=states)
            logprobs, is_greedy = jax.device_get(_target_scores(out.logits, jnp.asarray(target)))
            for row, i in enumerate(batch):
                scores[i] = logprobs[row, : len(inputs[i])]
                greedy[i] = is_greedy[row, : len(inputs[i])]
        return scores, greedy

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether every continuation token is the
        argmax) per (cache key, context ids, continuation ids); inputs longer than max_length
        lose tokens from the left, as HFLM's."""
        inputs, targets, lengths = [], [], []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("loglikelihood needs a non-empty context and continuation (token ids)")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append(whole[:-1])
            targets.append(whole[1:])
            lengths.append(len(continuation))
        results = []
        scores, greedy = self.score_tokens(inputs, targets)
        for (key, _, _), row, row_greedy, n in zip(requests, scores, greedy, lengths):
            answer = (float(np.sum(row[-n:], dtype=np.float64)), bool(np.all(row_greedy[-n:])))
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, from the prefix token, in HFLM's disjoint windows
        of at most max_length tokens."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generates for each (context, gen_kwargs); see the module docstring."""
        args = [req.args for req in requests]
        keys = generation_keys(self.seed, requests)
        results: list[str | None] = [None] * len(args)
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, (context, gen_kwargs) in enumerate(args):
            special = not (self.tokenizer.bos_token and context.startswith(self.tokenizer.bos_token))
            groups.setdefault((json.dumps(gen_kwargs, sort_keys=True, default=str), special), []).append(index)
        progress = tqdm(total=len(args), desc="huginn-jax generate_until", disable=disable_tqdm)
        for (_, special), indices in groups.items():
            call = self._generation_options(args[indices[0]][1])
            until = call.pop("until")
            lengths = [len(self.tokenizer.encode(args[i][0], add_special_tokens=special)) for i in indices]
            for batch in length_batches(lengths, self.batch_size):
                members = [indices[b] for b in batch]
                padded = [*members, *[members[0]] * (self.batch_size - len(members))]
                try:
                    out = complete(self.model.params, self.tokenizer, [args[i][0] for i in padded],
                                   config=self.model.config, stop_strings=until, add_special_tokens=special,
                                   key=keys[np.asarray(padded)], **call)
                except TypeError as err:  # an option the chosen sampler does not take
                    raise ValueError(f"huginn-jax gen_kwargs: {err}") from None
                for i, text in zip(members, out.texts):
                    results[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", args[i], results[i])
                progress.update(len(members))
        progress.close()
        return results  # type: ignore[return-value]

    def _generation_options(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """complete()'s options from lm-eval's gen_kwargs: until (with the eos text, as HFLM),
        max_new_tokens, the sampler and its options, the sampling."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id],
                                                                                     skip_special_tokens=False))
        max_new_tokens = kwargs.pop("max_gen_toks")
        if "max_length" in kwargs:
            raise ValueError("huginn-jax gen_kwargs: use max_gen_toks (new tokens), not max_length")
        sampler = kwargs.pop("sampler", self.sampler)
        if sampler is None:
            sampler = sampler_name(kwargs)
            defaults = base_options(sampler, self.num_steps)
        else:
            sampler, defaults = sampler_defaults(sampler, self.num_steps)
        options = {**defaults, **with_sampling(kwargs, GREEDY)}
        return {"until": [s for s in until if s], "max_new_tokens": max_new_tokens, "sampler": sampler, **options}
