"""Whole-loop CUDA graphs, keyed by a frozen shape key (after vLLM's CUDA-graph runner).

The first request for a key runs the loop eagerly (that is the warm-up: it allocates every workspace and picks
kernels), then the loop is captured once; later requests copy their inputs into the static buffers and replay.
A graph is never replayed for another key: the pipeline looks it up by the exact key. ``debug`` records the
addresses of the static buffers at capture and checks them before each replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdtrt.errors import SdtrtError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopKey:
    """Everything a captured loop bakes in."""

    batch: int
    height: int
    width: int
    scheduler: str
    steps: int
    cfg: bool  # guidance > 1: the UNet runs on [uncond; cond], 2B rows
    start: int  # first evaluation (img2img skips the first ones)
    chunks: tuple[int, ...] = ()  # prompt chunks of each UNet row (R = 2B under guidance, else B): text lengths 77k


class LoopGraph:
    """One captured loop. ``buffers`` are the static tensors the loop reads and writes."""

    def __init__(self, key: LoopKey, loop: Callable[[], None], buffers: list[torch.Tensor], *, debug: bool = False):
        self.key = key
        self._loop = loop
        self._buffers = buffers
        self._ptrs = [b.data_ptr() for b in buffers]
        self._debug = debug
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # thread_local: a server captures on its worker thread while other threads (HTTP, logging) run CUDA calls
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                loop()
        torch.cuda.current_stream().wait_stream(stream)
        log.info("captured denoising loop for %s", key)

    def replay(self) -> None:
        if self._debug and [b.data_ptr() for b in self._buffers] != self._ptrs:
            raise SdtrtError(f"static buffers moved since the loop for {self.key} was captured")
        self.graph.replay()
