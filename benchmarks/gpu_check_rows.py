"""The harness of benchmarks/gpu_check.py: rows written the moment they are measured, an internal
deadline, short errors, and the timing / sync-counting helpers its sections share.

Each row is one JSON object on its own line of ``<out>/gpu_check.jsonl``, flushed and fsynced
when written, so that a run killed at its time limit keeps every row before the kill.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch


def short_error(e: BaseException, lines: int = 4, chars: int = 600) -> str:
    """The last ``lines`` lines of ``e``'s traceback (the exception's own line last), at most
    ``chars`` characters: enough to name the failure, never a screenful."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip().splitlines()
    tail = " | ".join(s.strip() for s in text[-lines:] if s.strip())
    return tail[-chars:]


class Rows:
    """Rows of one run: appended to ``out_dir/gpu_check.jsonl`` as they come, each stamped with its
    section and the seconds since the start (``t_s``).

    Args:
        out_dir: created if missing.
        deadline_s: the run's internal deadline in seconds from now; ``left()`` counts down to it.
    """

    def __init__(self, out_dir: Path, deadline_s: float) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "gpu_check.jsonl"
        self.path.write_text("")
        self.t0 = time.monotonic()
        self.deadline_s = deadline_s
        self.section = "start"
        self.rows: list[dict] = []

    def left(self) -> float:
        """Seconds left before the deadline (negative past it)."""
        return self.deadline_s - (time.monotonic() - self.t0)

    def write(self, **row) -> dict:
        """Append one row (``section`` and ``t_s`` added) and print it as one line."""
        row = {"section": self.section, **row, "t_s": round(time.monotonic() - self.t0, 1)}
        line = json.dumps(row, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        print(line, flush=True)
        return row

    def run(self, section: str, fn: Callable[[], None], need_s: float) -> bool:
        """Run section ``fn`` if at least ``need_s`` seconds are left, else write one "skipped" row;
        an exception becomes one "error" row (last traceback lines) and the run goes on.
        Returns whether ``fn`` finished."""
        self.section = section
        if self.left() < need_s:
            self.write(status="skipped", reason=f"deadline: {self.left():.0f} s left, the section needs ~{need_s:.0f} s")
            return False
        try:
            fn()
            return True
        except Exception as e:  # one failing section must not hide the next ones
            self.write(status="error", error=short_error(e))
            return False

    def has_time(self, need_s: float, what: str) -> bool:
        """Whether ``need_s`` seconds are left; writes a "skipped" row for ``what`` when not."""
        if self.left() >= need_s:
            return True
        self.write(variant=what, status="skipped", reason=f"deadline: {self.left():.0f} s left, needs ~{need_s:.0f} s")
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(call: Callable[[dict], object], steps: list[dict], device: torch.device, repeats: int,
               before: Callable[[], object] = lambda: None) -> dict:
    """Mean milliseconds per step over ``steps[1:]`` for each of ``repeats`` trajectories, after one
    untimed warm-up trajectory.

    Each trajectory calls ``before()`` (which may return a context manager, e.g. a decision replay,
    held for the repeat), runs ``steps[0]`` untimed (the trajectory's first step: every cache
    computes fully), then times ``steps[1:]`` between two CUDA events (``time.perf_counter`` on
    CPU). Returns {"step_ms": median over repeats, "step_ms_repeats": each repeat's mean,
    "timed_steps": len(steps) - 1}."""
    per = []
    for r in range(repeats + 1):  # the first trajectory warms up (lazy compiles, allocator) and is dropped
        ctx = before()
        with (ctx if ctx is not None else _null()), torch.no_grad():
            call(steps[0])
            sync(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for kw in steps[1:]:
                    call(kw)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                for kw in steps[1:]:
                    call(kw)
                ms = (time.perf_counter() - t0) * 1e3
        if r:
            per.append(ms / max(1, len(steps) - 1))
    return {"step_ms": round(statistics.median(per), 3), "step_ms_repeats": [round(x, 3) for x in per],
            "timed_steps": len(steps) - 1}


@contextmanager
def _null():
    yield None


def count_host_syncs(call: Callable[[dict], object], steps: list[dict], device: torch.device,
                     before: Callable[[], object] = lambda: None) -> float | None:
    """Host synchronisations per step over ``steps[1:]`` (after an untimed ``steps[0]``), counted
    with ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call (``.item()``,
    a device-to-host copy, ``torch.cuda.synchronize``) warns once. None on CPU (no such mode)."""
    if device.type != "cuda":
        return None
    ctx = before()
    with (ctx if ctx is not None else _null()), torch.no_grad():
        call(steps[0])
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for kw in steps[1:]:
                    call(kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    n = sum(1 for w in caught if "synchroniz" in str(w.message))
    return round(n / max(1, len(steps) - 1), 2)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset, GB (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
