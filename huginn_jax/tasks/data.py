"""Reading the evaluation sets: offline JSONL files (the layout of shared/eval-data) or the hub.

With a data folder (the evaluate CLI's --data_dir), a task reads its file from that folder:
`gsm8k/test.jsonl`, `math500/test.jsonl`, `humaneval/HumanEval.jsonl`, `mbpp/mbpp.jsonl`. Without
one it asks the `datasets` library for the hub's copy (needs the package and a network); when that
is not possible the error says which file to pass with --data_dir.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

Doc = dict[str, Any]


class TaskDataError(RuntimeError):
    """The documents of a task cannot be read (the message says what to pass instead)."""


@dataclasses.dataclass(frozen=True)
class DataSource:
    local_file: str  # relative to --data_dir
    hub_path: str
    hub_name: str | None
    hub_split: str


def read_jsonl(path: Path) -> list[Doc]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TaskDataError(f"{path}:{number}: not a JSON line ({exc})") from None
    return docs


def _load_hub(task: str, source: DataSource) -> list[Doc]:
    hint = (f"pass --data_dir=DIR with {source.local_file} in it (the layout of shared/eval-data)")
    try:
        import datasets
    except ImportError:
        raise TaskDataError(f"{task}: no --data_dir given and the `datasets` package is not "
                            f"installed to fetch {source.hub_path}; {hint}") from None
    try:
        rows = datasets.load_dataset(source.hub_path, source.hub_name, split=source.hub_split)
    except Exception as exc:  # offline, missing, or blocked: all mean "use the local files"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskDataError(f"{task}: no --data_dir given and {source.hub_path} could not be "
                            f"loaded from the hub ({reason}); {hint}") from None
    return [dict(row) for row in rows]


def load_docs(task: str, source: DataSource, data_dir: str | Path | None, limit: int | None,
              keep: Callable[[Doc], bool] | None = None) -> list[Doc]:
    """The documents that `keep` accepts, in file order, the first `limit` of them."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if data_dir is None:
        docs = _load_hub(task, source)
    else:
        path = Path(data_dir) / source.local_file
        if not path.is_file():
            raise TaskDataError(f"--data_dir={data_dir}: {task} needs {path}, which does not exist "
                                f"(expected the layout of shared/eval-data: {source.local_file})")
        docs = read_jsonl(path)
    if keep is not None:
        docs = [doc for doc in docs if keep(doc)]
    return docs if limit is None else docs[:limit]
