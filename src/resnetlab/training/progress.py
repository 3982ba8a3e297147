"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise (nohup, CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class EpochProgress:
    """One epoch's progress: ``update`` after each step with running loss, accuracy and images/s.

    On a terminal (stderr is a TTY) this is a tqdm bar with time left; otherwise a log line at most
    every ``log_seconds`` so that a run under nohup or CI leaves a readable log and never a wall of
    carriage returns.
    """

    def __init__(
        self,
        epoch: int,
        epochs: int,
        steps: int,
        start: int = 0,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        log_seconds: float = 30.0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.label = f"epoch {epoch}/{epochs}"
        self.steps = steps
        self.step = start
        self.start = start
        self.t0 = time.monotonic()
        self.log_seconds = log_seconds
        self.last_log = time.monotonic()
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(
                total=steps, initial=start, desc=self.label, file=self.stream, leave=False, dynamic_ncols=True
            )

    def update(self, loss: float, acc: float, images_per_s: float) -> None:
        self.step += 1
        if not self.enabled:
            return
        stats = {"loss": f"{loss:.4f}", "acc": f"{100 * acc:.2f}%", "img/s": f"{images_per_s:.0f}"}
        if self.bar is not None:
            self.bar.set_postfix(stats, refresh=False)
            self.bar.update(1)
        elif time.monotonic() - self.last_log >= self.log_seconds and self.step < self.steps:
            self.last_log = time.monotonic()
            left = (self.last_log - self.t0) / (self.step - self.start) * (self.steps - self.step)
            print(
                f"{self.label} step {self.step}/{self.steps} loss {stats['loss']} acc {stats['acc']} "
                f"{stats['img/s']} img/s, {format_duration(left)} left",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunProgress:
    """Progress over a study's runs: a tqdm bar on a terminal, otherwise a plain line at most every
    ``log_seconds`` (and at the end), like :class:`EpochProgress`.

    Used as a context manager: when the study fails, the bar is removed rather than drawn again, so
    the error message stays the last line a user sees.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        unit: str = "run",
        log_seconds: float = 30.0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.note = ""
        self.t0 = self.last_log = time.monotonic()
        self.log_seconds = log_seconds
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def set_postfix_str(self, note: str) -> None:
        self.note = note
        if self.bar is not None:
            self.bar.set_postfix_str(note)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_log >= self.log_seconds or self.done >= self.total:
            self.last_log = now
            spent = now - self.t0
            left = spent / self.done * (self.total - self.done) if self.done else 0.0
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit}s done in {format_duration(spent)}"
                + (f", about {format_duration(left)} left" if self.done < self.total else ""),
                file=self.stream,
                flush=True,
            )

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            if failed:
                self.bar.leave = False
            self.bar.close()
            self.bar = None

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)
