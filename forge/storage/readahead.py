"""Reading ahead of the stage: a remote input's rows are fetched and parsed in a thread while the
stage works on the rows before them, at most `limit` rows ahead (bounded memory)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()
BLOCK = 256  # rows handed over at a time (one queue operation per block, not per row)


def read_ahead(items: Iterator[T], limit: int) -> Iterator[T]:
    """The items of `items`, produced in a thread up to `limit` ahead; its error is raised here,
    where the item it failed on would have been. Closing this generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(limit // BLOCK, 2))
    stop = threading.Event()

    def put(value: object) -> bool:
        """Hand `value` over, unless the reader stopped (then False)."""
        while not stop.is_set():
            try:
                q.put(value, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        block: list = []
        try:
            for item in items:
                block.append(item)
                if len(block) >= BLOCK:
                    if not put(block):
                        return
                    block = []
            if put(block):
                put(_END)
        except BaseException as exc:  # handed to the reader, raised where it reads
            if put(block):
                put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # the file it reads

    thread = threading.Thread(target=produce, name="forge-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            yield from got
    finally:
        stop.set()
