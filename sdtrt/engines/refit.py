"""LoRA on TensorRT: refit an engine built with ``sdtrt build --refit`` with merged weights, and back to base.

The ONNX parser names each engine weight after its ONNX initializer, so the manifest's LoRA map names what to
refit. Only changed weights are sent: those of the new set (merged), and those the previous set changed that the
new one does not (their base values, from the graph's own initializers). TensorRT may ask for weights that were
fused with a refitted one (``get_missing_weights``): they get their base values too. Refitting the base values
back, rather than subtracting deltas, keeps the base model exact (TensorRT #3628: LoRAs refitted one after another
without restoring the base weights mix).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sdtrt.errors import EngineError
from sdtrt.lora.targets import merged_initializer, read_initializers

if TYPE_CHECKING:  # the flavour's module is passed in; this import is for type checkers and the API check
    import tensorrt as trt  # noqa: F401

log = logging.getLogger(__name__)


class EngineRefit:
    """The LoRA state of one engine: which initializers hold non-base values now."""

    def __init__(self, trt: Any, logger: Any, engine: Any, component: str, onnx_path: Path,
                 targets: Mapping[str, Any], workdir: Path) -> None:
        self._trt = trt
        self._logger = logger
        self._engine = engine
        self.component = component
        self._onnx = onnx_path
        self._targets = targets
        self._workdir = workdir
        self.changed: set[str] = set()  # initializer names not at their base values

    def apply(self, mods: Mapping[str, torch.Tensor]) -> bool:
        """Refit so the weights are base + ``mods`` (module -> float32 delta); returns whether anything changed."""
        wanted = {self._targets[m]["initializer"]: m for m in mods}
        restore = self.changed - set(wanted)
        if not wanted and not restore:
            return False
        if not self._engine.refittable:
            cmd = shlex.join(["sdtrt", "build", str(self._workdir), "--refit"])
            raise EngineError(f"the {self.component} engine is not refittable, so LoRAs cannot be applied to it; "
                              f"rebuild the engines with `{cmd}`")
        base = read_initializers(self._onnx, set(wanted) | restore)
        values = {name: merged_initializer(base[name], mods[m], self._targets[m]) for name, m in wanted.items()}
        values.update({name: base[name] for name in restore})
        del base
        refit_engine(self._trt, self._logger, self._engine, self.component, values,
                     lambda names: read_initializers(self._onnx, names))
        self.changed = set(wanted)
        log.info("refitted %d %s weights (%d to base)", len(values), self.component, len(restore))
        return True


def refit_engine(trt: Any, logger: Any, engine: Any, component: str, values: Mapping[str, np.ndarray],
                 base_of: Any) -> None:
    """One refit of ``engine`` with ``values`` (initializer name -> array in the graph's dtype and layout); weights
    TensorRT reports missing get ``base_of(names)``. Every bool TensorRT returns is checked."""
    with logger.capture() as messages:
        refitter = trt.Refitter(engine, logger)
        known = set(refitter.get_all_weights())
        unknown = sorted(set(values) - known)
        if unknown:
            raise EngineError(f"the {component} engine has no refittable weight named {unknown[0]} "
                              f"({len(unknown)} of {len(values)} missing): it was not built from this export's "
                              "graph; rebuild it")
        keep = []  # trt.Weights borrow the arrays' memory until the refit is done
        for name, arr in values.items():
            keep.append(_set(trt, refitter, component, name, arr))
        missing = sorted(set(refitter.get_missing_weights()) - set(values))
        if missing:
            for name, arr in base_of(set(missing)).items():
                keep.append(_set(trt, refitter, component, name, arr))
        if not refitter.refit_cuda_engine():
            from sdtrt.engines import compat

            raise EngineError(f"TensorRT could not refit the {component} engine: {compat.errors_text(messages)}")
    del keep


def _set(trt: Any, refitter: Any, component: str, name: str, arr: np.ndarray) -> tuple:
    arr = np.ascontiguousarray(arr)
    weights = trt.Weights(arr)
    if not refitter.set_named_weights(name, weights):
        raise EngineError(f"TensorRT refused new weights for {name} of the {component} engine "
                          f"({arr.dtype}, {arr.shape}); rebuild the engine from this export")
    return arr, weights
