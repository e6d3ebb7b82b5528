"""Command line: `python -m convert import ...` and `python -m convert export ...`.

Exit status 0 on success; 1 with one message listing every problem (bad input, existing output
without --overwrite, NaN/Inf with --strict, failed --verify), and nothing written at --output.
"""

from __future__ import annotations

import logging
import sys

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

COMMANDS = ("import", "export")


def main(argv: list[str]) -> None:
    command = argv[1] if len(argv) == 2 else None
    if command not in COMMANDS or not FLAGS.source or not FLAGS.output:
        print(f"usage: python -m convert {{{','.join(COMMANDS)}}} --source=... --output=... [flags]; "
              "see --helpfull", file=sys.stderr)
        sys.exit(2)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every step at INFO

    from convert.exporter import export_checkpoint
    from convert.importer import import_checkpoint
    from convert.progress import human
    from huginn_jax.config import ConfigError
    from huginn_jax.loading import CheckpointError

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
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as err:
        print(f"convert {command}: error: {err}", file=sys.stderr)
        sys.exit(1)
    for warning in result.warnings:
        print(f"convert {command}: warning: {warning} (use --strict to make this an error)", file=sys.stderr)
    print(summary)


if __name__ == "__main__":
    app.run(main)
