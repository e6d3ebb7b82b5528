"""What every command line of the project shares: one or two lines on stderr for an error, never a
traceback, exit status 1 for a failure and 2 for a usage error.

    if __name__ == "__main__":
        cli.run(main)          # instead of absl's app.run(main)

`main` raises `cli.UsageError` for a bad flag value (naming the flag) and may let the project's own
errors (ValueError and its subclasses: CheckpointError, ConfigError, TokenizerError, ...; OSError)
propagate: `run` prints them as `prog: error: ...` (the message's first lines) and exits.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app

MAX_LINES = 2


class UsageError(Exception):
    """A flag value that cannot be used; the message names the flag."""


def _say(message: str) -> None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = spec.name.removesuffix(".__main__") if spec is not None else os.path.basename(sys.argv[0] or "huginn-jax")
    lines = [line for line in str(message).strip().splitlines() if line.strip()] or [type(message).__name__]
    shown = lines[:MAX_LINES]
    if len(lines) > MAX_LINES:
        shown[-1] += f" (and {len(lines) - MAX_LINES} more)"
    print(f"{prog}: error: " + "\n  ".join(shown), file=sys.stderr)


def run(main: Callable[[list[str]], None], flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
    """absl's `app.run(main)` with the project's error handling; `flags_parser` replaces absl's flag
    parsing (as absl's: it parses absl's flags and returns the arguments for `main`). Without it,
    a script takes flags only: a positional argument is a usage error."""

    def guarded(argv: list[str]) -> None:
        try:
            if flags_parser is None and len(argv) > 1:
                raise UsageError(f"unexpected arguments {argv[1:]}; flags are --name=value")
            main(argv)
        except UsageError as err:
            _say(str(err))
            sys.exit(2)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            sys.exit(130)
        except (ValueError, OSError, KeyError) as err:
            _say(str(err) if not isinstance(err, KeyError) else f"missing {err}")
            sys.exit(1)

    app.run(guarded, **({} if flags_parser is None else {"flags_parser": flags_parser}))
