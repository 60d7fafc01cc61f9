"""Read-ahead for streaming merges: a thread loads the next tensors while one merges.

On a CPU merge two things alternate per tensor: reading ``m + 1`` tensors from disk
(or the page cache) and the arithmetic (TIES's top-k, sign election, sums). Both
release the GIL, so a single reader thread overlaps them. Memory stays bounded by a
byte budget: the reader starts on the next tensor only while the raw bytes it holds
(loaded but not yet finished by the merger, the tensor being merged included) plus
the next tensor's bytes fit in ``budget``, or when the merger has nothing at all, so
a tensor larger than the budget is still read, just not ahead of time.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["prefetched"]

T = TypeVar("T")


def prefetched(names: Sequence[str], load: Callable[[str], T], size_of: Callable[[str], int],
               budget: int) -> Iterator[tuple[str, T]]:
    """Yield ``(name, load(name))`` in order; with ``budget > 0`` loads run ahead in a
    thread (see the module docstring). An error in ``load`` is raised in the consumer
    when it reaches that tensor; closing the iterator early stops the thread."""
    if budget <= 0:
        for name in names:
            yield name, load(name)
        return
    cond = threading.Condition()
    ready: deque[tuple[str, T, int]] = deque()
    state: dict[str, Any] = {"inflight": 0, "error": None, "stop": False}

    def worker() -> None:
        try:
            for name in names:
                size = size_of(name)
                with cond:
                    cond.wait_for(lambda size=size: state["stop"] or state["inflight"] == 0
                                  or state["inflight"] + size <= budget)
                    if state["stop"]:
                        return
                    state["inflight"] += size
                item = load(name)
                with cond:
                    ready.append((name, item, size))
                    cond.notify_all()
                del item
        except BaseException as exc:  # handed to the consumer
            with cond:
                state["error"] = exc
                cond.notify_all()

    thread = threading.Thread(target=worker, name="lingoforge-merge-reader", daemon=True)
    thread.start()
    try:
        for _ in names:
            with cond:
                cond.wait_for(lambda: bool(ready) or state["error"] is not None)
                if not ready:
                    raise state["error"]
                name, item, size = ready.popleft()
            yield name, item
            del item  # the merger is done with it: release before accounting
            with cond:
                state["inflight"] -= size
                cond.notify_all()
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        thread.join()
