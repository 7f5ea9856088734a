"""The reference backend: the checkpoint's own torch modules (fp16 on CUDA, fp32 on CPU), behind the same graph
wrappers the exporter traces, so every backend computes the same function."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from sdtrt.errors import CheckpointError
from sdtrt.lora.deltas import LoraDeltas
from sdtrt.lora.targets import module_of
from sdtrt.runtime.backends.base import BufferedRunner


class TorchRunner(BufferedRunner):
    def __init__(self, name: str, entry: Mapping, module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__(name, entry, device, float_dtype=dtype)
        self.module = module
        self._in_names = [s["name"] for s in entry["inputs"]]
        self._out_names = [s["name"] for s in entry["outputs"]]

    def run(self) -> None:
        with torch.inference_mode():
            out = self.module(*(self.inputs[n] for n in self._in_names))
            out = out if isinstance(out, tuple) else (out,)
            for name, value in zip(self._out_names, out, strict=True):
                self.outputs[name].copy_(value)


class TorchBackend:
    """Loads the WORKDIR's source checkpoint (recorded in the manifest) into torch modules."""

    name = "torch"

    def __init__(self, workdir: Path, manifest: Mapping, device: torch.device) -> None:
        from sdtrt.checkpoint.loader import load_checkpoint
        from sdtrt.export.modules import graph_modules
        from sdtrt.runtime.families import text_encoder_names

        source = Path(manifest["source"]["path"])
        if not source.exists():
            raise CheckpointError(f"the torch backend runs the source checkpoint, {source}, which is missing; "
                                  "use --backend onnxruntime or tensorrt, or restore the checkpoint")
        opts = manifest["source"].get("load_options", {})
        # The export's tokenizers stand in for ones that sat beside a single file or came from --tokenizer: the
        # tokenizer folder itself (SD), or the folder holding tokenizer/ and tokenizer_2/ (SDXL's --tokenizer).
        one = text_encoder_names(manifest["model"]) == ("text_encoder",)
        ckpt = load_checkpoint(source, config_dir=opts.get("config_dir"), allow_pickle=bool(opts.get("allow_pickle")),
                               tokenizer_dir=workdir / "tokenizer" if one else workdir, vae=opts.get("vae"), ema=bool(opts.get("ema")))
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.capturable = device.type == "cuda"
        self._manifest = manifest
        # the exporter's own wrappers (sdtrt.export.modules), so both compute the same graphs
        # fp16 on CUDA, except a VAE exported in fp32 (SDXL's default: its VAE overflows in fp16)
        vae32 = manifest.get("precision", {}).get("vae") == "fp32"
        self._dtypes: dict[str, torch.dtype] = {}
        self._modules = {}
        for n, m in graph_modules(ckpt).items():
            self._dtypes[n] = torch.float32 if vae32 and n.startswith("vae") else self.dtype
            self._modules[n] = m.eval().to(device=device, dtype=self._dtypes[n])
        # diffusers keeps the sinusoidal timestep projection in fp32 itself; nothing else to special-case.
        self.source = ckpt
        self._base: dict[tuple[str, str], torch.Tensor] = {}  # base weights of the modules a LoRA changed now

    def apply_lora(self, lora: LoraDeltas) -> None:
        """In place (same tensors, so captured graphs still read them); the changed modules' base weights are kept
        and copied back, so returning to base is bit-exact."""
        with torch.no_grad():
            wanted = {(c, n) for c, mods in lora.by_component.items() for n in mods}
            for key in [k for k in self._base if k not in wanted]:
                self._weight(*key).copy_(self._base.pop(key))
            for comp, mods in lora.by_component.items():
                for name, delta in mods.items():
                    w = self._weight(comp, name)
                    base = self._base.setdefault((comp, name), w.clone())
                    w.copy_((base.float() + delta.to(w.device)).to(w.dtype))

    def _weight(self, component: str, name: str) -> torch.Tensor:
        return module_of(component, self._modules[component], name).weight

    def runner(self, component: str) -> TorchRunner:
        entry = self._manifest["components"][component]
        return TorchRunner(component, entry, self._modules[component], self.device, self._dtypes[component])
