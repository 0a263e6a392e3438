"""Run `medmax ARGS...` in this process with test hooks patched in (tests/test_termination.py):

    python termination_driver.py SPEC_JSON ARGS...

SPEC_JSON may hold
  "pause": {"target": "module:Attr.path", "call": N, "marker": FILE}: after the N-th call of the
      target in the main thread returns, write FILE and sleep until a signal stops the process
      (a point where the stage has its temporary files open);
  "count": {"target": "module:Attr.path", "file": FILE}: append a line to FILE at every call.
Nothing here is read by the pipeline itself: the hooks are patched into this one process.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable


def _resolve(target: str) -> tuple[Any, str]:
    module_name, _, attr_path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def _patch(target: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    owner, name = _resolve(target)
    setattr(owner, name, wrap(getattr(owner, name)))


def _pausing(call: int, marker: Path) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    calls = [0]

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def paused(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if threading.current_thread() is threading.main_thread():
                calls[0] += 1
                if calls[0] == call:
                    marker.write_text("paused\n")
                    while True:  # the test's signal ends this (termination.Terminated)
                        time.sleep(0.05)
            return result

        return paused

    return wrap


def _counting(file: Path) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            with open(file, "a") as f:
                f.write("call\n")
            return original(*args, **kwargs)

        return counted

    return wrap


def main() -> int:
    spec = json.loads(sys.argv[1])
    if "pause" in spec:
        _patch(spec["pause"]["target"], _pausing(int(spec["pause"].get("call", 1)), Path(spec["pause"]["marker"])))
    if "count" in spec:
        _patch(spec["count"]["target"], _counting(Path(spec["count"]["file"])))
    from medmax_pipeline.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
