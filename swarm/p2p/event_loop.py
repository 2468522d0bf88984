"""An asyncio loop on a daemon thread, so synchronous training code can await hivemind P2P calls."""

from __future__ import annotations

import asyncio
import threading
from typing import TypeVar
from collections.abc import Awaitable

T = TypeVar("T")

SHUTDOWN_TIMEOUT_S = 5.0


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

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Cancel every task still on the loop (a hivemind P2P client's reader and writer, say) and wait for
        them, let the transports they close finish closing, then stop and close the loop.

        Stopping alone left those tasks pending: when the process later garbage-collected the loop and the
        client, asyncio logged "Task was destroyed but it is pending!" and the client's `__del__` raised
        "Event loop is closed", in the middle of the next run's output (a sweep runs many in one process)."""
        if self.loop.is_closed():
            return
        if self.loop.is_running():
            try:
                self.run(_cancel_other_tasks(), timeout)
            except (TimeoutError, RuntimeError):
                pass  # a task that ignores cancellation: stop the loop anyway
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=timeout)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(3):  # a cancelled writer's transport closes on the next iterations (connection_lost)
        await asyncio.sleep(0)
