"""Progress of a long stage: a tqdm bar on a terminal, else a plain line every so often (for logs).

One reporter for the stages that work through a known number of items (generate: rows and
tokens; clip-scores: rows; convert-checkpoint: tensors and megabytes; judge: requests; train:
optimizer steps and tokens, with loss and learning rate as details), so their log lines read
alike: `LABEL: ITEMS done/total (pct%), rate UNIT/s, ETA 0h00m00s[, detail value, ...]`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping

PROGRESS_INTERVAL_S = 60.0


def format_progress(rows_done: int, rows_total: int, tokens: float, elapsed_s: float, rows_this_run: int | None = None,
                    label: str = "generate", items: str = "rows", unit: str = "tokens",
                    details: Mapping[str, str] | None = None) -> str:
    """One progress line: items done/total, `unit` per second, ETA, then any `details` (train: loss,
    lr) as ', name value'. Rate and ETA come from the `rows_this_run` items done since this run
    started (default: all; resumed items cost nothing)."""
    rows_this_run = rows_done if rows_this_run is None else rows_this_run
    rate = tokens / elapsed_s if elapsed_s > 0 else 0.0
    pct = 100.0 * rows_done / rows_total if rows_total else 100.0
    eta = eta_text(rows_done, rows_total, rows_this_run, elapsed_s)
    extra = "".join(f", {name} {value}" for name, value in (details or {}).items())
    return f"{label}: {items} {rows_done}/{rows_total} ({pct:.1f}%), {rate:.1f} {unit}/s, ETA {eta}{extra}"


def eta_text(done: int, total: int, done_this_run: int, elapsed_s: float) -> str:
    """'1h02m05s' left at this run's pace (items done before it, e.g. resumed or cached, cost nothing)."""
    if done >= total:
        return "0h00m00s"
    if done_this_run <= 0 or elapsed_s <= 0:
        return "unknown"
    eta_s = int(elapsed_s * (total - done) / done_this_run)
    return f"{eta_s // 3600}h{eta_s % 3600 // 60:02d}m{eta_s % 60:02d}s"


class Progress:
    """tqdm on a terminal (unless `bar=False`, as train's --no-progress); otherwise a format_progress
    line at most every `interval_s` seconds, at the end, and with `first_line` after the first update.
    `show=False` prints nothing (a training rank other than the main one).

    update(n, amount, details): n more items done, `amount` more of `unit` (tokens, megabytes, ...),
    `details` the latest values to show (bar postfix, or the end of the line). A stage whose line
    says more (judge: failures) passes `describe(progress, elapsed_s) -> line`."""

    def __init__(self, total: int, done: int = 0, interval_s: float = PROGRESS_INTERVAL_S, stream: Any = None,
                 clock: Callable[[], float] = time.monotonic, label: str = "generate", items: str = "rows",
                 unit: str = "tokens", describe: Callable[["Progress", float], str] | None = None,
                 bar: bool = True, first_line: bool = False, show: bool = True):
        self.total, self.done, self.tokens = total, done, 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s, self.clock = interval_s, clock
        self.label, self.items, self.unit = label, items, unit
        self.details: dict[str, str] = {}
        self.describe = describe or (lambda p, elapsed: format_progress(p.done, p.total, p.tokens, elapsed, p.done - p.start_done,
                                                                        p.label, p.items, p.unit, p.details))
        self.start = clock()
        self.last: float | None = None if first_line else self.start
        self.start_done = done
        self.show = show
        self.bar = None
        if show and bar and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=label, unit=items.rstrip("s") or "item", file=self.stream)

    def update(self, rows: int, tokens: float = 0.0, details: Mapping[str, str] | None = None) -> None:
        self.done += rows
        self.tokens += tokens
        self.details = dict(details or {})
        if not self.show:
            return
        if self.bar is not None:
            self.bar.update(rows)
            if self.details:
                self.bar.set_postfix(self.details)
            return
        now = self.clock()
        if self.last is None or now - self.last >= self.interval_s or self.done >= self.total:
            self.last = now
            print(self.describe(self, now - self.start), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
