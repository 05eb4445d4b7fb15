"""What stands between a request and the model: deadlines, fair decoding, micro-batching.

``Decoder`` decodes uploads on a bounded thread pool, FIFO per image, so one request full of
hostile images cannot starve the others; ``MicroBatcher`` gathers the decoded images of
concurrent requests into batches for one inference thread. Both raise ``ApiError``, which the
app (``serve.py``) turns into a JSON error response. No FastAPI here: these are plain asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import images as images_lib
from .settings import ServeConfig

log = logging.getLogger(__name__)


STATUS_FOR_KIND = {
    "too_large": 413,
    "not_image": 415,
    "unsupported": 415,
    "empty": 422,
    "undecodable": 422,
    "too_many_pixels": 422,
    "too_slow": 422,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def timeout_error(settings: ServeConfig, stage: str) -> ApiError:
    return ApiError(504, "timeout", f"no result within {settings.timeout_s:g} s ({stage})")


class Deadline:
    """One request's time limit, shared by every stage (reading, decoding, queueing, model)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


class MicroBatcher:
    """Collects images from concurrent requests into batches for one inference thread."""

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        settings: ServeConfig,
        observe_batch: Callable[[int], None],
    ):
        self.predict = predict
        self.settings = settings
        self.observe_batch = observe_batch
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.waiting = 0  # images queued or in the running batch
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, pixels: np.ndarray, deadline: Deadline | None = None) -> np.ndarray:
        """uint8 [N,S,S,3] → probabilities [N,C]; raises ApiError 503/504."""
        deadline = deadline or Deadline(self.settings.timeout_s)
        n = len(pixels)
        if self.waiting + n > self.settings.queue_images:
            raise ApiError(
                503, "overloaded", "too many images waiting; retry shortly", {"Retry-After": "1"}
            )
        self.waiting += n
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline.left())
        except TimeoutError:
            future.cancel()  # the worker skips it if it has not run yet
            raise timeout_error(self.settings, "waiting for the model") from None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Greedy batching: take the first request, then everything already queued behind
            # it, up to max_batch. Requests that arrive while the model runs form the next
            # batch, so a lone request never waits and a busy server still batches.
            batch = [await self.queue.get()]
            count = len(batch[0][0])
            while count < self.settings.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
                count += len(batch[-1][0])
            # Optionally wait a little longer for company (off by default).
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while count < self.settings.max_batch and (remaining := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
                batch.append(item)
                count += len(item[0])
            live = [(px, fut) for px, fut in batch if not fut.done()]
            try:
                if live:
                    stacked = np.concatenate([px for px, _ in live])
                    self.observe_batch(len(stacked))
                    probs = await loop.run_in_executor(self.executor, self.predict, stacked)
                    offset = 0
                    for px, fut in live:
                        if not fut.done():
                            fut.set_result(probs[offset : offset + len(px)])
                        offset += len(px)
            except Exception as e:  # an inference failure fails its requests, not the server
                log.error("inference failed: %s: %s", type(e).__name__, e)
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(ApiError(500, "inference_failed", str(e)))
            finally:
                self.waiting -= sum(len(px) for px, _ in batch)


class Decoder:
    """Decodes uploads with bounded concurrency and bounded cost, fairly across requests.

    At most ``decode_workers`` images decode at once, in their own threads; each request
    decodes its images one after another, queueing (FIFO) for a thread each time, so one
    request with 64 hostile images holds one thread at a time and a good request behind it
    waits for at most the images already running. Each image has its own deadline inside
    ``images.decode``; the request's deadline covers the queueing too, and what is still queued
    when it passes is dropped, never run.
    """

    def __init__(self, settings: ServeConfig):
        self.settings = settings
        workers = settings.decode_workers or os.cpu_count() or 1
        self.executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self.slots = asyncio.Semaphore(workers)

    async def _run(self, deadline: Deadline, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(deadline.left()):
                async with self.slots:
                    return await loop.run_in_executor(self.executor, lambda: fn(*args, **kw))
        except TimeoutError:
            raise timeout_error(self.settings, "decoding") from None

    async def decode(
        self, files: list[tuple[str, bytes]], size: int, deadline: Deadline
    ) -> list[images_lib.Decoded]:
        """Each file → uint8 ``[size,size,3]`` (``size``: the model's input size)."""
        s = self.settings
        pixels = await self._run(
            deadline, lambda: [images_lib.header_pixels(data, s.max_pixels) for _, data in files]
        )
        if sum(pixels) > s.max_request_pixels:
            raise ApiError(
                413,
                "too_many_pixels",
                f"the request's images hold {sum(pixels):,} pixels; at most "
                f"{s.max_request_pixels:,} per request (send fewer or smaller images)",
            )
        out = []
        for name, data in files:
            try:
                out.append(
                    await self._run(
                        deadline,
                        images_lib.decode,
                        data,
                        name,
                        size=size,
                        max_pixels=s.max_pixels,
                        max_seconds=s.decode_timeout_s,
                    )
                )
            except images_lib.ImageError as e:
                raise ApiError(STATUS_FOR_KIND.get(e.kind, 422), e.kind, str(e)) from None
        return out

    def stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
