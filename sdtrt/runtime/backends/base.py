"""The one backend protocol: a backend makes a ``Runner`` per component; a runner owns static buffers.

Lifecycle (after Polygraphy's runners): ``activate(dims)`` allocates the input and output buffers for one shape
(a no-op when the shape is unchanged) -> the caller copies into ``inputs`` -> ``run()`` enqueues the graph, reading
``inputs`` and writing ``outputs`` -> ``deactivate()`` frees them. Buffers are *static*: the same tensors, at the
same addresses, for every ``run()`` at one shape, which is what lets the pipeline capture a whole denoising loop in
one CUDA graph. The pipeline never asks which backend it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch

from sdtrt.errors import ShapeError

if TYPE_CHECKING:
    from sdtrt.lora.deltas import LoraDeltas

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


FP32_INPUTS = ("timestep", "time_ids")  # float32 in every graph: sinusoidal embeddings of values up to 1000s


class Runner(Protocol):
    """One component graph (text_encoder, unet, vae_decoder or vae_encoder) on one backend."""

    name: str
    inputs: dict[str, torch.Tensor]  # static input buffers of the active shape
    outputs: dict[str, torch.Tensor]  # static output buffers of the active shape: valid until the next run()

    def check(self, dims: Mapping[str, int]) -> None:
        """Raise ``ShapeError`` if this runner cannot run shape ``dims`` (an engine's profile); allocates nothing."""

    def activate(self, dims: Mapping[str, int]) -> None: ...

    def run(self) -> None: ...

    def release(self, dims: Mapping[str, int]) -> None:
        """Free the buffers kept for shape ``dims`` (nothing captured may still use them)."""

    def deactivate(self) -> None: ...


class Backend(Protocol):
    """``capturable``: runners' ``run()`` may be recorded into a CUDA graph on ``torch.cuda.current_stream()``."""

    name: str
    device: torch.device
    capturable: bool

    def runner(self, component: str) -> Runner: ...

    def apply_lora(self, lora: LoraDeltas) -> None:
        """Make each LoRA-targetable weight ``base + delta`` for the modules in ``lora.by_component`` and exactly
        ``base`` for every other one (``sdtrt.lora.deltas.BASE`` restores the base model bit for bit). Runners made
        earlier see the new weights."""


def resolve_shape(shape: list[int | str], dims: Mapping[str, int]) -> tuple[int, ...]:
    """A manifest shape (ints and axis names such as ``"2B"``, ``"H"``, ``"8H"``) with its axis names resolved."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d in dims:
            out.append(int(dims[d]))
        else:
            raise ShapeError(f"no size given for axis {d!r}")
    return tuple(out)


class BufferedRunner:
    """Shared buffer management: subclasses implement ``_bind()`` (after (re)allocation) and ``run()``."""

    def __init__(self, name: str, entry: Mapping, device: torch.device, float_dtype: torch.dtype | None = None) -> None:
        self.name = name
        self.device = device
        self._entry = entry
        self._float_dtype = float_dtype  # overrides the manifest's float dtypes (the torch backend computes natively)
        self._dims: dict[str, int] | None = None
        self._by_shape: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def _dtype(self, spec: Mapping) -> torch.dtype:
        dt = DTYPES[spec["dtype"]]
        if self._float_dtype is not None and dt.is_floating_point and spec["name"] not in FP32_INPUTS:
            return self._float_dtype
        return dt

    def _alloc(self, specs, dims) -> dict[str, torch.Tensor]:
        return {
            s["name"]: torch.zeros(resolve_shape(s["shape"], dims), dtype=self._dtype(s), device=self.device)
            for s in specs
        }

    def activate(self, dims: Mapping[str, int]) -> None:
        """Make the buffers of shape ``dims`` current. Buffers are kept per shape: a CUDA graph captured at
        shape A still reads and writes the same tensors after requests at shape B ran in between."""
        dims = dict(dims)
        if dims == self._dims:
            return
        key = tuple(sorted(dims.items()))
        try:
            if key not in self._by_shape:
                self._by_shape[key] = (self._alloc(self._entry["inputs"], dims), self._alloc(self._entry["outputs"], dims))
            self.inputs, self.outputs = self._by_shape[key]
            self._dims = dims
            self._bind()
        except BaseException:
            self._dims = None  # never leave a half-bound shape looking active
            raise

    def _bind(self) -> None:
        pass

    def check(self, dims: Mapping[str, int]) -> None:
        """Graph backends run any shape their dynamic axes allow; engines override this with their profile."""

    def release(self, dims: Mapping[str, int]) -> None:
        dims = dict(dims)
        self._by_shape.pop(tuple(sorted(dims.items())), None)
        if dims == self._dims:
            self.inputs, self.outputs, self._dims = {}, {}, None

    def deactivate(self) -> None:
        self.inputs, self.outputs, self._dims = {}, {}, None
        self._by_shape.clear()
