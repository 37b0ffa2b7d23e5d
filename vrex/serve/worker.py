"""The single model thread: steps the live sessions one unit of work at a time (a question, else
the newest frame), the least recently served session first.

Why one thread: the model is shared (read-only weights, one cache per session) and the machine
has few cores; torch already uses them inside each step. A session whose step raises is marked
failed and the loop goes on with the others.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from vrex.serve.live import LiveSession


class Worker:
    def __init__(self, sessions: Callable[[], list[LiveSession]], threads: int | None = None,
                 on_idle: Callable[[], None] | None = None, model_lock: threading.Lock | None = None):
        self._sessions, self._threads, self._on_idle = sessions, threads, on_idle
        self.model_lock = model_lock or threading.Lock()  # held around every model step
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vrex-serve-worker", daemon=True)
        self.steps = 0
        self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        while not self._stop.is_set():
            busy = [s for s in self._sessions() if s.has_work()]
            if not busy:
                if self._on_idle is not None:
                    self._on_idle()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self._round(busy)
            time.sleep(0)  # let client threads take the GIL between rounds

    def _round(self, busy: list[LiveSession]) -> None:
        """One unit of work of one session (``vrex.serve.cluster`` steps them all at once)."""
        # Least recently served first: under overload every session gets the same share of
        # steps, whatever the phase of its frames' arrivals (plain round-robin over the
        # sessions that happen to have a frame at the start of a round favours the first ones).
        session = min(busy, key=lambda s: s.last_served)
        session.last_served = time.monotonic()
        try:
            with self.model_lock:
                session.step()
        except Exception as e:  # noqa: BLE001 - isolation: one session's failure never stops the others
            self.errors += 1
            session.fail(e)
        self.steps += 1
