"""What every exported component declares: its traceable module, graph I/O and the inputs to check it on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sdtrt.export.graph import GraphIO


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as the manifest describes it: symbolic shape (ints and axis names) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # "float", "int32", "uint8"; "float" is fp16 or fp32 by the component's precision


class CheckSize(NamedTuple):
    """One shape to trace or check a component at: ``batch`` images of ``height`` x ``width`` px, with prompts of
    ``chunks`` 75-token chunks (the UNet's text axis is 77 * chunks long; other graphs ignore it)."""

    batch: int
    height: int
    width: int
    chunks: int = 1


@dataclass(frozen=True)
class ComponentExport:
    """One graph to export: ``module`` maps ``inputs`` to ``outputs`` (torch, fp32); ``make_inputs(size,
    generator)`` builds example inputs at one ``CheckSize`` (the trace uses the first of ``check_sizes``; validation
    runs every one of them, so dynamic axes are exercised on a second shape)."""

    name: str
    module: torch.nn.Module
    io: GraphIO
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    make_inputs: Callable[[CheckSize, torch.Generator], tuple[torch.Tensor, ...]]
    check_sizes: tuple[CheckSize, ...]


def dynamic_axes(specs: tuple[TensorSpec, ...]) -> dict[str, dict[int, str]]:
    return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}


def graph_io(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], fp32_inputs: tuple[str, ...] = ()) -> GraphIO:
    return GraphIO(
        input_names=tuple(s.name for s in inputs),
        output_names=tuple(s.name for s in outputs),
        dynamic_axes=dynamic_axes(inputs + outputs),
        fp32_inputs=fp32_inputs,
    )
