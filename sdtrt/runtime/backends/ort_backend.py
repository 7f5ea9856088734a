"""ONNX Runtime backend: the WORKDIR's graphs, run with IO binding straight into the runner's static torch buffers
(CPU execution provider; the CUDA one, on the caller's stream, where onnxruntime-gpu is installed).

LoRA: no re-export. A LoRA set gets sessions of its own for the components it changes, with the changed
initializers overridden (``SessionOptions.add_initializer``, merged from the graph's own initializers and the
manifest's map); the last ``LORA_SESSIONS`` sets are kept, and the base sessions are kept for good.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from sdtrt.errors import EngineError
from sdtrt.lora.deltas import LoraDeltas
from sdtrt.lora.targets import LORA_ROOTS, merged_initializer, read_initializers
from sdtrt.runtime.backends.base import BufferedRunner

LORA_SESSIONS = 4  # sessions of LoRA sets kept per component (least recently used beyond are dropped)

_NP = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


class OrtRunner(BufferedRunner):
    def __init__(self, name: str, entry: Mapping, session, device: torch.device) -> None:
        super().__init__(name, entry, device)
        self.session = session
        self._binding = None

    def _bind(self) -> None:
        b = self.session.io_binding()
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        dev_id = self.device.index or 0
        for name, t in self.inputs.items():
            b.bind_input(name, kind, dev_id, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        for name, t in self.outputs.items():
            b.bind_output(name, kind, dev_id, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        self._binding = b

    def run(self) -> None:
        self.session.run_with_iobinding(self._binding)

    def use_session(self, session) -> None:
        """Run ``session`` from now on (another LoRA set's weights): the active shape is re-bound to it."""
        if session is self.session:
            return
        self.session = session
        if self._dims is not None:
            self._bind()


class OrtBackend:
    """ONNX Runtime sessions are created lazily, one per component, on first use."""

    name = "onnxruntime"
    capturable = False  # ORT enqueues on its own; the pipeline runs its loop eagerly with this backend

    def __init__(self, workdir: Path, manifest: Mapping, device: torch.device, threads: int = 0, *,
                 allow_spinning: bool = False) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.workdir = Path(workdir)
        self.device = device
        self._manifest = manifest
        self._threads = threads
        self._spin = "1" if allow_spinning else "0"
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError("onnxruntime has no CUDA execution provider here: install onnxruntime-gpu")
            self.name = "onnxruntime-cuda"
        else:
            self.name = "onnxruntime-cpu"
        self._sessions: dict[str, object] = {}
        self._runners: dict[str, list[OrtRunner]] = {}
        self._lora_sessions: OrderedDict[tuple, tuple[object, list]] = OrderedDict()  # (comp, key) -> session, values
        self._lora_key: tuple = ()

    def _session(self, component: str, initializers: Mapping[str, object] | None = None):
        """The base session of ``component`` (made once), or, with ``initializers``, a new session with those
        initializers overridden (the caller keeps the values alive as long as the session)."""
        if initializers is not None or component not in self._sessions:
            entry = self._manifest["components"][component]
            path = self.workdir / entry["files"][0]["path"]
            opts = self._ort.SessionOptions()
            opts.log_severity_level = 3
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self._threads:
                opts.intra_op_num_threads = self._threads
            # Spinning off, on every device: after each run ORT's pool threads otherwise busy-wait for the next
            # one, but in sdtrt's loop what comes next is torch (CFG, the scheduler step, post-processing) or
            # another library, which then runs on the cores the spinners hold. On 2 CPU cores with 2 ORT threads
            # spinning made sdtrt's own ORT loop 2.2x slower and a torch pipeline run after it 1.2x slower
            # (benchmarks/ort_spinning.py). On CUDA the pool only hosts CPU-placed nodes, so waking it is cheap
            # (not measured). ``allow_spinning`` turns it back on, to measure it; it helps only when ORT runs back
            # to back with nothing else.
            opts.add_session_config_entry("session.intra_op.allow_spinning", self._spin)
            opts.add_session_config_entry("session.inter_op.allow_spinning", self._spin)
            if self.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device).cuda_stream
                # a bare "cuda" device means the current one (torch.cuda.set_device, e.g. per Triton instance)
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                providers = [("CUDAExecutionProvider", {"device_id": index,
                                                        "user_compute_stream": str(stream)})]
            else:
                providers = ["CPUExecutionProvider"]
            for name, value in (initializers or {}).items():
                opts.add_initializer(name, value)
            if any(len(v.shape()) == 4 for v in (initializers or {}).values()):
                # ORT_ENABLE_ALL's NCHWc layout pass on CPU repacks Conv weights from the model's own initializers
                # and ignores overrides of them (measured: a LoCon's conv deltas were lost); one level lower keeps them
                opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            try:
                session = self._ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # ORT raises its own exception types for bad graphs and OOM
                raise EngineError(f"onnxruntime could not load {path}: {e}") from e
            if initializers is not None:
                return session
            self._sessions[component] = session
        return self._sessions[component]

    def _current(self, component: str):
        hit = self._lora_sessions.get((component, self._lora_key))
        return hit[0] if hit is not None else self._session(component)

    def apply_lora(self, lora: LoraDeltas) -> None:
        for comp, runners in self._runners.items():
            if comp not in LORA_ROOTS:
                continue
            mods = lora.by_component.get(comp)
            session = self._lora_session(comp, lora.key, mods) if mods else self._session(comp)
            for r in runners:
                r.use_session(session)
        self._lora_key = lora.key

    def _lora_session(self, component: str, key: tuple, mods: Mapping[str, torch.Tensor]):
        hit = self._lora_sessions.get((component, key))
        if hit is not None:
            self._lora_sessions.move_to_end((component, key))
            return hit[0]
        entry = self._manifest["components"][component]
        targets = entry["lora"]["targets"]
        base = read_initializers(self.workdir / entry["files"][0]["path"], {targets[m]["initializer"] for m in mods})
        values = {targets[m]["initializer"]: self._ort.OrtValue.ortvalue_from_numpy(
                  merged_initializer(base[targets[m]["initializer"]], d, targets[m])) for m, d in mods.items()}
        del base
        session = self._session(component, values)
        self._lora_sessions[(component, key)] = (session, list(values.values()))
        while len([k for k in self._lora_sessions if k[0] == component]) > LORA_SESSIONS:
            oldest = next(k for k in self._lora_sessions if k[0] == component)
            del self._lora_sessions[oldest]
        return session

    def runner(self, component: str) -> OrtRunner:
        if component not in self._manifest["components"]:
            raise EngineError(f"{self.workdir}: the workdir has no {component} graph; export it")
        runner = OrtRunner(component, self._manifest["components"][component], self._current(component), self.device)
        self._runners.setdefault(component, []).append(runner)  # LoRA switches re-point it
        return runner
