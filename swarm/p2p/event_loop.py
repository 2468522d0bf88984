"""An asyncio loop on a daemon thread, so synchronous training code can await hivemind P2P calls."""

from __future__ import annotations

import asyncio
import threading
from typing import TypeVar
from collections.abc import Awaitable

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "swarm-p2p") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Awaitable[T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and wait for its result (TimeoutError after `timeout` seconds)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def shutdown(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
