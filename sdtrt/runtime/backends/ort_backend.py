"""ONNX Runtime backend: the WORKDIR's graphs, run with IO binding straight into the runner's static torch buffers
(CPU execution provider; the CUDA one, on the caller's stream, where onnxruntime-gpu is installed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from sdtrt.errors import EngineError
from sdtrt.runtime.backends.base import BufferedRunner

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

    def _session(self, component: str):
        if component not in self._sessions:
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
            try:
                self._sessions[component] = self._ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # ORT raises its own exception types for bad graphs and OOM
                raise EngineError(f"onnxruntime could not load {path}: {e}") from e
        return self._sessions[component]

    def runner(self, component: str) -> OrtRunner:
        if component not in self._manifest["components"]:
            raise EngineError(f"{self.workdir}: the workdir has no {component} graph; export it")
        return OrtRunner(component, self._manifest["components"][component], self._session(component), self.device)
