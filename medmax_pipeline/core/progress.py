"""Progress of a long stage: a tqdm bar on a terminal, else a plain line every so often (for logs).

One reporter for the stages that work through a known number of items (generate: rows and
tokens; clip-scores: rows; convert-checkpoint: tensors and megabytes), so their log lines read
alike: `LABEL: ITEMS done/total (pct%), rate UNIT/s, ETA`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

PROGRESS_INTERVAL_S = 60.0


def format_progress(rows_done: int, rows_total: int, tokens: float, elapsed_s: float, rows_this_run: int | None = None,
                    label: str = "generate", items: str = "rows", unit: str = "tokens") -> str:
    """One progress line: items done/total, `unit` per second, ETA. Rate and ETA come from the
    `rows_this_run` items done since this run started (default: all; resumed items cost nothing)."""
    rows_this_run = rows_done if rows_this_run is None else rows_this_run
    rate = tokens / elapsed_s if elapsed_s > 0 else 0.0
    if rows_done >= rows_total:
        eta = "0h00m00s"
    elif rows_this_run > 0 and elapsed_s > 0:
        eta_s = int(elapsed_s * (rows_total - rows_done) / rows_this_run)
        eta = f"{eta_s // 3600}h{eta_s % 3600 // 60:02d}m{eta_s % 60:02d}s"
    else:
        eta = "unknown"
    pct = 100.0 * rows_done / rows_total if rows_total else 100.0
    return f"{label}: {items} {rows_done}/{rows_total} ({pct:.1f}%), {rate:.1f} {unit}/s, ETA {eta}"


class Progress:
    """tqdm on a terminal; otherwise a format_progress line at most every `interval_s` seconds (and at the end).

    update(n, amount): n more items done, `amount` more of `unit` (tokens, megabytes, ...)."""

    def __init__(self, total: int, done: int = 0, interval_s: float = PROGRESS_INTERVAL_S, stream: Any = None,
                 clock: Callable[[], float] = time.monotonic, label: str = "generate", items: str = "rows",
                 unit: str = "tokens"):
        self.total, self.done, self.tokens = total, done, 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s, self.clock = interval_s, clock
        self.label, self.items, self.unit = label, items, unit
        self.start = self.last = clock()
        self.start_done = done
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=label, unit=items.rstrip("s") or "item", file=self.stream)

    def update(self, rows: int, tokens: float) -> None:
        self.done += rows
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(rows)
            return
        now = self.clock()
        if now - self.last >= self.interval_s or self.done >= self.total:
            self.last = now
            line = format_progress(self.done, self.total, self.tokens, now - self.start, self.done - self.start_done,
                                   self.label, self.items, self.unit)
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
