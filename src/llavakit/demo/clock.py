"""What both demos share around their phases: a new output folder, and a clock for each phase.

The clock records wall seconds and CPU seconds (this process, all threads) per phase, and the load
average at the start and the end of the run, so a slow run can be told apart from a busy machine:
on an idle 2-core machine CPU seconds are about twice the wall seconds and the load average is about
2. With another busy process, 2-thread phases slow down many times over and their CPU seconds grow
too (threads spin waiting for each other; docs/demo.md), so neither number is load-independent.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def new_out_dir(out_dir: str | Path) -> Path:
    """`out_dir`, created; refused when it exists and is not empty (a demo never overwrites a run)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out folder (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_average() -> float | None:
    """The 1-minute load average, where the system has one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class PhaseClock:
    """`with clock.phase(name):` (or `start(name)` ... `stop()`) around each phase; `report()` gives the
    metrics.json fields."""

    def __init__(self, say: Callable[[str], None] = print):
        self.say = say
        self.t0 = time.perf_counter()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.load = {"start": load_average()}
        self._name: str | None = None
        self._at = (self.t0, time.process_time())

    def start(self, name: str) -> None:
        self._name, self._at = name, (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        wall, cpu = time.perf_counter() - self._at[0], time.process_time() - self._at[1]
        self.wall[self._name], self.cpu[self._name] = round(wall, 1), round(cpu, 1)
        self.say(f"[{self._name}] {wall:.1f}s ({cpu:.1f} CPU s)")

    @contextmanager
    def phase(self, name: str):
        self.start(name)
        yield
        self.stop()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)

    def report(self) -> dict:
        """{"seconds", "phases" (wall s), "phases_cpu" (CPU s), "load_average" {"start", "end"}}."""
        return {"seconds": self.seconds(), "phases": dict(self.wall), "phases_cpu": dict(self.cpu),
                "load_average": {**self.load, "end": load_average()}}


def start_run(out_dir: str | Path, seed: int, say: Callable[[str], None] = print) -> tuple[Path, PhaseClock]:
    """A demo run's start: its new output folder, torch seeded, and the clock of its phases."""
    import torch

    out = new_out_dir(out_dir)
    torch.manual_seed(seed)
    return out, PhaseClock(say)
