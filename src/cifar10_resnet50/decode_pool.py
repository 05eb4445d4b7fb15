"""Decoding many image files on several cores, in order: the folder data source (a whole
folder once, then cached) and ``predict`` (a stream of files, overlapped with the model)
share it. The web server decodes differently (threads, per-request deadlines and fairness:
latency, not throughput) and shares only :mod:`.images`.

Processes, not threads: Pillow's decoders and Lanczos hold the GIL for part of their work,
and a hostile file that hits the per-image time limit then stalls only its own worker.
``spawn`` workers import numpy and Pillow only (:mod:`.images` is torch-free), never the
parent's torch threads or CUDA state.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from .images import decode_many, ignore_interrupts

# Chunks decoded ahead of the consumer per worker: enough that a worker never waits for the
# consumer to take its last chunk, few enough that memory stays small (at 64 px and 64 files,
# 0.8 MB a chunk).
AHEAD_PER_WORKER = 2

# (paths, names for error messages or None) → (uint8 [n,S,S,3], (width, height) each, errors)
Chunk = tuple[list[str], list[str] | None]
Decoded = tuple[np.ndarray, list[tuple[int, int]], list[str]]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def decode_in_order(chunks: Iterable[Chunk], size: int, workers: int) -> Iterator[Decoded]:
    """:func:`images.decode_many` of each chunk, yielded in the chunks' order; ``workers``
    processes decode up to :data:`AHEAD_PER_WORKER` chunks each ahead of the consumer (in this
    process, one chunk at a time, when ``workers`` is 0). ``chunks`` is consumed lazily."""
    chunks = iter(chunks)
    if workers <= 0:
        for paths, names in chunks:
            yield decode_many(paths, size, names)
        return
    pool = ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=ignore_interrupts
    )
    pending: deque[Future] = deque()

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append(pool.submit(decode_many, chunk[0], size, chunk[1]))

    try:
        for _ in range(workers * AHEAD_PER_WORKER):
            submit()
        while pending:
            future = pending.popleft()
            submit()
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
