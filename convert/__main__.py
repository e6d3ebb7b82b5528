"""Command line: `python -m convert import ...` and `python -m convert export ...`.

Exit status 0 on success; 1 with a short message and no traceback (one line, or one per problem of
a checkpoint) for bad input, an existing output without --overwrite, an output that is, contains
or lies inside the source, NaN/Inf with --strict, a failed --verify, or an output that cannot be
written (read-only or full disk); 2 for usage errors (no or an unknown command, a missing,
unknown or malformed flag); 128 + the signal number after SIGINT (130) or SIGTERM (143). On every
failure nothing of the attempt is left at --output, and an existing output is kept.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "import: a Hugging Face model folder, a weights file (.safetensors, .bin, "
                    ".pt) or a Hub id; export: a converted checkpoint folder.")
flags.DEFINE_string("output", None, "Folder to create (written to a temporary folder, renamed when complete).")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"],
                  "Stored dtype. import: default bfloat16; export: default the checkpoint's.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output (only once the new one is complete).")
flags.DEFINE_bool("strict", False, "Treat NaN or Inf weights as an error instead of a warning.")
flags.DEFINE_bool("verify", False, "import: reload and compare every tensor bitwise with the source, and run "
                  "a short forward pass.")
flags.DEFINE_string("revision", None, "import from the Hub: branch, tag or commit.")
flags.DEFINE_string("config", None, "import: config.json to use (default: the one beside the weights).")
flags.DEFINE_string("max_shard_size", "5GB", "export: largest shard (5GB = 5e9 bytes, 2GiB = 2^31 bytes).")
flags.DEFINE_enum("tied_head", "auto", ["auto", "store", "omit"],
                  "export with tied embeddings: store lm_head.weight as a copy of the embedding (as the released "
                  "checkpoints do), omit it, or do what the imported source did (auto).")
flags.DEFINE_bool("progress", True, "Show a progress bar (bytes and tensors done) on stderr.")


def _positive_size(text: str) -> bool:
    from convert.exporter import parse_size

    try:
        return parse_size(text) > 0
    except ValueError:
        return False


flags.register_validator("max_shard_size", _positive_size,
                         message="--max_shard_size must be a positive size such as 5GB, 2GiB or 500MB")

COMMANDS = ("import", "export")
USAGE = f"usage: python -m convert {{{','.join(COMMANDS)}}} --source=... --output=... [flags]; see --helpfull"


def usage_error(message: str) -> NoReturn:
    print(f"convert: usage error: {message}\n{USAGE}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag a usage error (exit 2)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        usage_error(str(err))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that the same cleanup runs."""

    signum = signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str]) -> None:
    command = argv[1] if len(argv) == 2 else None
    if command not in COMMANDS:
        usage_error(f"expected one command, {' or '.join(COMMANDS)}, got {' '.join(argv[1:]) or 'none'}")
    missing = [f"--{name}" for name in ("source", "output") if not getattr(FLAGS, name)]
    if missing:
        usage_error(f"{' and '.join(missing)} must be given")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every step at INFO

    from convert.exporter import export_checkpoint
    from convert.importer import import_checkpoint
    from convert.progress import human

    fail = f"convert {command}: error:"
    try:
        if command == "import":
            result = import_checkpoint(FLAGS.source, FLAGS.output, dtype=FLAGS.dtype or "bfloat16",
                                       overwrite=FLAGS.overwrite, strict=FLAGS.strict, verify=FLAGS.verify,
                                       revision=FLAGS.revision, config_path=FLAGS.config, progress=FLAGS.progress)
            summary = (f"imported {result.tensors} tensors ({human(result.bytes_read)} read) into "
                       f"{result.output} as {result.dtype} in {result.seconds:.1f} s"
                       + ("; verified" if result.verified else ""))
        else:
            tied = {"auto": None, "store": True, "omit": False}[FLAGS.tied_head]
            result = export_checkpoint(FLAGS.source, FLAGS.output, dtype=FLAGS.dtype,
                                       max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite,
                                       strict=FLAGS.strict, tied_head=tied, progress=FLAGS.progress)
            summary = (f"exported {result.tensors} tensors ({human(result.bytes_written)}) in "
                       f"{len(result.shards)} shard(s) to {result.output} in {result.seconds:.1f} s")
    except (FileExistsError, ValueError) as err:  # CheckpointError and ConfigError are ValueErrors
        print(f"{fail} {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:
        if err.filename is not None and os.path.abspath(err.filename) == os.path.abspath(FLAGS.output):
            print(f"{fail} cannot write --output={FLAGS.output}: {err.strerror}", file=sys.stderr)
        else:
            print(f"{fail} {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # a bug: still one line, named by its type
        print(f"{fail} unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
              file=sys.stderr)
        sys.exit(1)
    for warning in result.warnings:
        print(f"convert {command}: warning: {warning} (use --strict to make this an error)", file=sys.stderr)
    print(summary)


def run() -> None:
    """`app.run(main)`, with SIGTERM like SIGINT: either one, at any moment (start-up included),
    ends the run with one line and exit status 128 + its number, after the cleanup."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        command = next((a for a in sys.argv[1:] if a in COMMANDS), "")
        print(f"convert{' ' + command if command else ''}: interrupted by {signal.Signals(signum).name}; nothing of "
              "this run is left at --output", file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    run()
