"""Progress of a conversion in bytes and tensors done, on stderr: a tqdm bar when tqdm is installed,
else a plain line at every tenth of the work."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """Counts bytes and tensors and shows them when `enabled`."""

    def __init__(self, total_bytes: int, total_tensors: int, description: str, enabled: bool = True):
        self.total_bytes, self.total_tensors, self.description = total_bytes, total_tensors, description
        self.enabled = enabled
        self.tensors = 0
        self.bytes = 0
        self._bar: Any = None
        self._tenths = 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # the bar is a convenience: fall back to plain lines
                return
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
                             dynamic_ncols=True)
            self._bar.set_postfix_str(f"0/{total_tensors} tensors")

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.bytes += nbytes
        self.tensors += tensors
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
        elif self.enabled and self.bytes * 10 // max(self.total_bytes, 1) > self._tenths:
            self._tenths = self.bytes * 10 // max(self.total_bytes, 1)
            print(f"{self.description}: {human(self.bytes)}/{human(self.total_bytes)}, "
                  f"{self.tensors}/{self.total_tensors} tensors", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def human(nbytes: float) -> str:
    """1.5 GiB, 20.0 MiB, ..."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError
