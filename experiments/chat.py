"""An interactive multi-turn chat with a checkpoint, in a terminal or over a pipe.

    python -m experiments.chat --checkpoint=ckpt/huginn-0125 [--sampler=diffusion] [--system="..."]
    printf 'Hi!\\nWhat is 7 x 8?\\n' | python -m experiments.chat --checkpoint=ckpt/huginn-0125

Every line you type is the user's message; the reply streams as it is generated and ends with one
line of statistics. The conversation is kept in the chat template (the model sees every earlier
turn). Commands:

    /reset              forget the conversation (the system message stays)
    /sampler NAME       ar, adaptive, speculative or diffusion
    /steps N            recurrence steps per token (num_steps)
    /set name=value,... any sampler option by the reference's names (lm-eval style), e.g. /set exit_t=0.05
    /help, /quit

Ctrl-C during a reply stops that reply; at the prompt (or end of input) it ends the chat.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import jax
from absl import flags

from experiments.common import quiet_jax_logs
from huginn_jax import cli
from huginn_jax.pretrained import load_model_and_tokenizer
from samplers.dispatch import SHORT_NAMES, parse_gen_kwargs, with_sampling
from samplers.sampling import SamplingConfig
from samplers.text import TextStreamer, chat, summary_line

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A converted or Hugging Face layout checkpoint folder with a chat template.")
flags.DEFINE_string("system", None, "A system message at the start of the conversation.")
flags.DEFINE_enum("sampler", "ar", sorted(SHORT_NAMES), "Sampler to start with (/sampler changes it).")
flags.DEFINE_integer("num_steps", 32, "Recurrence steps per token (/steps changes it).")
flags.DEFINE_string("gen_kwargs", "", "Further sampler options, lm-eval style: 'inner_recurrence=4,exit_t=0.03'.")
flags.DEFINE_integer("max_new_tokens", 512, "Longest reply, in tokens.")
flags.DEFINE_float("temperature", 0.7, "Sampling temperature (0: greedy).")
flags.DEFINE_float("top_p", 0.95, "Top-p filter (1: off).")
flags.DEFINE_integer("seed", 0, "PRNG seed (each reply draws from it and its turn number).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default: the checkpoint's).")

HELP = "commands: /reset, /sampler ar|adaptive|speculative|diffusion, /steps N, /set name=value,..., /help, /quit"


class Session:
    """The conversation and the generation settings of one chat."""

    def __init__(self, system: str | None, sampler: str, options: dict[str, Any]):
        self.system, self.sampler, self.options = system, sampler, options
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line: str, out: TextIO) -> bool:
        """Handles a /command; False to quit."""
        name, _, argument = line[1:].strip().partition(" ")
        argument = argument.strip()
        if name in ("quit", "exit"):
            return False
        if name == "reset":
            self.reset()
            print("(conversation reset)", file=out)
        elif name == "sampler" and argument in SHORT_NAMES:
            self.sampler = argument
            print(f"(sampler: {argument})", file=out)
        elif name == "steps" and argument.isdigit() and int(argument) > 0:
            self.options["num_steps"] = int(argument)
            print(f"(num_steps: {argument})", file=out)
        elif name == "set" and argument:
            try:
                self.options = with_sampling(parse_gen_kwargs(argument), self.options["sampling"]) | {
                    k: v for k, v in self.options.items() if k != "sampling" and k not in parse_gen_kwargs(argument)}
                print(f"(set {argument})", file=out)
            except ValueError as err:
                print(f"(error: {err})", file=out)
        else:
            print(f"({HELP})", file=out)
        return True


def reply(params: dict, config: Any, tokenizer: Any, session: Session, turn: int, out: TextIO) -> None:
    """Generates and streams the assistant's reply to the conversation so far, then its statistics."""
    first: list[float] = []
    streamer = TextStreamer(tokenizer, file=out)

    def stream(new: list) -> None:
        if not first and len(new[0]):
            first.append(time.perf_counter())
        streamer(new)

    stream.end = streamer.end  # type: ignore[attr-defined]
    options = dict(session.options, key=jax.random.fold_in(jax.random.key(FLAGS.seed), turn))
    start = time.perf_counter()
    try:
        result = chat(params, tokenizer, [session.messages], config=config, max_new_tokens=FLAGS.max_new_tokens,
                      sampler=session.sampler, streamer=stream, **options)
    except KeyboardInterrupt:
        session.messages.append({"role": "assistant", "content": streamer.texts[0] if streamer.texts else ""})
        print("\n(reply stopped)", file=out)
        return
    end = time.perf_counter()
    session.messages.append({"role": "assistant", "content": result.texts[0]})
    print(file=out)
    print(f"[{session.sampler}: {summary_line(result.output, 0, end - start, end - first[0] if first else None)}]",
          file=out, flush=True)


def main(argv: list[str]) -> None:
    if not FLAGS.checkpoint:
        raise cli.UsageError("--checkpoint is required (a converted or Hugging Face layout folder)")
    quiet_jax_logs()
    config, params, tokenizer = load_model_and_tokenizer(FLAGS.checkpoint, FLAGS.dtype)
    if tokenizer.chat_template is None:
        raise cli.UsageError(f"--checkpoint={FLAGS.checkpoint} has no chat template (tokenizer_config.json); use "
                             "experiments.generate --prompt for plain text")
    base = SamplingConfig(do_sample=FLAGS.temperature > 0, temperature=FLAGS.temperature or 1.0, top_p=FLAGS.top_p)
    options = with_sampling(parse_gen_kwargs(FLAGS.gen_kwargs), base)
    options.setdefault("num_steps", FLAGS.num_steps)
    session = Session(FLAGS.system, FLAGS.sampler, options)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    if interactive:
        print(f"chatting with {FLAGS.checkpoint} ({HELP})", file=out)
    turn = 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, out):
                return
            continue
        session.messages.append({"role": "user", "content": line})
        if not interactive:
            print(f"you> {line}", file=out)
        print("Huginn> ", end="", file=out, flush=True)
        reply(params, config, tokenizer, session, turn, out)
        turn += 1


if __name__ == "__main__":
    cli.run(main)
