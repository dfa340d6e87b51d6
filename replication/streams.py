"""Group commit over a blocking stream: take what has arrived, then commit once.

gRPC's synchronous servicers get requests from a blocking iterator, so they cannot
ask "is more already here?". :func:`batches` runs the iterator on a reader thread
feeding a bounded queue, and yields lists: it waits for the first item, then takes
every item already queued (up to ``max_items``) without waiting. A caller applies
a batch, fsyncs once, and acknowledges the batch: one fsync per burst, and an
acknowledgement as soon as the stream goes quiet. So the batch grows by itself
while the caller is slow (adaptive group commit) and shrinks to one item when the
caller keeps up (no added latency).

``prepare``, when given, is applied to every item on the reader thread before it
is queued: work that does not depend on the caller's state (converting a message,
starting to decode a frame on a pool) then overlaps with the caller's work on the
previous batch. ``queue_size`` bounds how many prepared items wait.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["batches"]

_END = object()


def _pump(
    source: Iterator[object],
    q: queue.Queue[object],
    stop: threading.Event,
    failure: list[BaseException],
    prepare: Callable[[Any], object] | None,
) -> None:
    """Reader thread: move items into ``q`` until the source ends or the consumer stops."""
    try:
        for item in source:
            if prepare is not None:
                item = prepare(item)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.5)  # bounded: a slow consumer pushes back
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except BaseException as err:  # handed to the consumer
        failure.append(err)
    finally:
        q.put(_END)


def _take_queued(q: queue.Queue[object], batch: list[object], max_items: int) -> bool:
    """Append items already queued to ``batch``; return True when the end was seen."""
    while len(batch) < max_items:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return False
        if item is _END:
            return True
        batch.append(item)
    return False


def batches(
    source: Iterator[Any],
    *,
    max_items: int = 64,
    queue_size: int = 256,
    prepare: Callable[[Any], T] | None = None,
) -> Iterator[list[T]]:
    """Yield lists of (prepared) items from ``source``; re-raise the reader's error at the end.

    An error raised by ``prepare`` ends the stream like an error of ``source``.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=queue_size)
    failure: list[BaseException] = []
    stop = threading.Event()
    threading.Thread(
        target=_pump, args=(source, q, stop, failure, prepare), name="stream-reader", daemon=True
    ).start()
    try:
        while True:
            first = q.get()
            if first is _END:
                break
            batch = [first]
            first = None  # no reference kept while the next get() waits
            ended = _take_queued(q, batch, max_items)
            yield batch  # type: ignore[misc]
            batch = []
            if ended:
                break
    finally:
        stop.set()
    if failure:
        raise failure[0]
