"""The one owner of the served model: a thread that runs the batched engine over every request in flight.

HTTP handlers never touch the model. They hand a `Request` to `Worker.submit`, which refuses at once
when `max_batch` rows are decoding and `max_queue` more are waiting (the server answers 503), and
they learn of its text and its end through the request's callbacks. A request whose client went away
is cancelled and leaves the batch at the next step, so a dropped connection frees its slot. Generation
always runs on this one thread, with the thread count set for it: torch's thread team is per thread, and
one collapsed under load when generation ran on whichever pool thread came first.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.generation.engine import BatchedGenerator, Request


class Worker:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch: int = 32,
                 max_queue: int = 64, threads: int | None = None, log: Callable[[str], None] | None = None):
        self.engine = BatchedGenerator(model, tokenizer, max_batch)
        self.capacity = max_batch + max_queue
        self.threads = threads
        self.log = log
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.in_flight = 0  # submitted and not yet finished
        self.served = 0
        self._thread = threading.Thread(target=self._run, name="lmforge-generation", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> bool:
        """Queue `request`; False (and nothing queued) when the server is full."""
        with self._lock:
            if self.in_flight >= self.capacity:
                return False
            self.in_flight += 1
        then = request.on_done

        def finished() -> None:
            with self._lock:
                self.in_flight -= 1
                self.served += 1
            if then is not None:
                then()

        request.on_done = finished
        self._inbox.put(request)
        return True

    def stats(self) -> dict:
        return {"in_flight": self.in_flight, "decoding": len(self.engine.active), "waiting": len(self.engine.waiting),
                "capacity": self.capacity, "served": self.served}

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        engine = self.engine
        while True:
            try:  # wait for work when idle; between steps, take what arrived without waiting
                item = self._inbox.get(timeout=None if not engine.busy else 0)
            except queue.Empty:
                item = ...
            while item is not ...:
                if item is None:
                    engine.cancel_all("cancelled", "the server is shutting down")
                    return
                engine.submit(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = ...
            try:
                engine.step()
            except Exception as exc:  # noqa: BLE001 (the rows in the batch fail; the server lives on)
                if self.log is not None:
                    self.log(f"serve: generation failed ({type(exc).__name__}: {exc}); its requests get an error")
                engine.cancel_all("error", f"{type(exc).__name__}: {exc}")
