"""The progress of a dataset build: a tqdm bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class BuildProgress:
    """tqdm on a terminal, plain periodic lines otherwise; on stdout, so that stderr holds
    only what went wrong (the CLI's one `error:` line)."""

    def __init__(self, total: int, enabled: bool, expected: dict | None = None) -> None:
        self.enabled, self.total, self.done, self.t0 = enabled, total, 0, time.time()
        self.expected = dict(expected or {})  # unit key -> images counted in `total` before its objects were read
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="data", dynamic_ncols=True, file=sys.stdout)

    def settle(self, key: Any, images: int) -> None:
        """The unit `key` turned out to hold `images` images (its objects are read): correct the total."""
        delta = int(images) - int(self.expected.pop(key, images))
        if delta:
            self.total += delta
            if self.bar is not None:
                self.bar.total = self.total
                self.bar.refresh()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(msg[:60])
        else:
            el = time.time() - self.t0
            print(f"[data {el:6.0f}s {self.done}/{self.total}] {msg}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
