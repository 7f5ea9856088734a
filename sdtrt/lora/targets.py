"""Which modules a LoRA may change, and (at export) which ONNX initializer holds each one's weight.

Module names are diffusers' own (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``; the text
encoder's with transformers' ``text_model.`` level), which is what diffusers/PEFT LoRA keys spell and what kohya
keys flatten with ``_``. The exporter records, per component, ``{"targets": {module: {"initializer", "dtype",
"layout", "shape"}}, "unmapped": {module: reason}}``: torch's exporter stores a Linear weight transposed for
``MatMul`` and constant folding renames it (``onnx::MatMul_123``), so each weight is found by content: a digest
of it in fp16 and fp32, as is and transposed, against a digest of every initializer of that size. Weights held
by no initializer or by several (identical weights) are left out with the reason, never guessed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

# component -> where the diffusers/transformers model's modules sit inside the exported wrapper module
LORA_ROOTS: dict[str, str] = {"unet": "unet.", "text_encoder": ""}
# LoRA key prefixes (kohya flattened with "_", diffusers/PEFT dotted) -> component
KOHYA_PREFIXES: dict[str, str] = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                                  "lora_te2_": "text_encoder_2"}
PEFT_PREFIXES: dict[str, str] = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}

_FLOAT = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
_NP = {"float32": np.float32, "float16": np.float16}


def target_modules(component: str, wrapper: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(diffusers module name, module) of every Linear and Conv2d of an exported component's wrapper."""
    root = LORA_ROOTS[component]
    for name, module in wrapper.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.startswith(root):
            yield name[len(root):], module


def module_of(component: str, wrapper: torch.nn.Module, name: str) -> torch.nn.Module:
    return wrapper.get_submodule(LORA_ROOTS[component] + name)


def _digest(a: np.ndarray | bytes) -> str:
    return hashlib.blake2b(a if isinstance(a, bytes) else np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class WeightPrint:
    """A module weight's digests in each dtype and layout the graph may hold it in."""

    name: str
    shape: tuple[int, ...]
    digests: dict[tuple[str, str], str]  # (dtype, layout) -> digest


def fingerprint(component: str, wrapper: torch.nn.Module) -> list[WeightPrint]:
    """Digests of every LoRA-targetable weight, one tensor at a time (taken before the module may be freed)."""
    prints = []
    with torch.no_grad():
        for name, module in target_modules(component, wrapper):
            w = module.weight.detach()
            digests = {}
            for dtype in ("float16", "float32"):
                a = w.to(getattr(torch, dtype)).cpu().numpy()
                digests[(dtype, "as_is")] = _digest(a)
                if a.ndim == 2:
                    digests[(dtype, "transposed")] = _digest(a.T)
            prints.append(WeightPrint(name, tuple(w.shape), digests))
    return prints


def map_initializers(model: onnx.ModelProto, prints: list[WeightPrint]) -> dict[str, Any]:
    """The manifest's LoRA map of one graph: each module's weight matched to the one initializer holding it."""
    sizes = {int(np.prod(p.shape)) for p in prints}
    by_digest: dict[str, list[tuple[str, str]]] = {}
    for init in model.graph.initializer:  # one tensor at a time
        if init.data_type not in _FLOAT or int(np.prod(init.dims)) not in sizes:
            continue
        raw = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
        by_digest.setdefault(_digest(raw), []).append((init.name, _FLOAT[init.data_type]))
    found: dict[str, list[tuple[str, str, str]]] = {}
    for p in prints:
        found[p.name] = sorted({(name, dtype, layout) for (dt, layout), d in p.digests.items()
                                for name, dtype in by_digest.get(d, ()) if dtype == dt})
    claims: dict[str, int] = {}
    for hits in found.values():
        for name in {h[0] for h in hits}:
            claims[name] = claims.get(name, 0) + 1
    targets, unmapped = {}, {}
    for p in prints:
        hits = found[p.name]
        if not hits:
            unmapped[p.name] = "no initializer holds this weight"
        elif len(hits) > 1 or claims[hits[0][0]] > 1:
            shared = sorted({h[0] for h in hits})
            unmapped[p.name] = f"ambiguous: identical weights ({', '.join(shared)} match more than one way)"
        else:
            init, dtype, layout = hits[0]
            targets[p.name] = {"initializer": init, "dtype": dtype, "layout": layout, "shape": list(p.shape)}
    return {"targets": targets, "unmapped": unmapped}


def to_graph_layout(delta: torch.Tensor, target: Mapping[str, Any]) -> np.ndarray:
    """A float32 delta in the module's weight shape -> the initializer's layout (float32 numpy)."""
    d = delta.float().cpu().numpy()
    return np.ascontiguousarray(d.T) if target["layout"] == "transposed" else d


def merged_initializer(base: np.ndarray, delta: torch.Tensor, target: Mapping[str, Any]) -> np.ndarray:
    """base + delta computed in float32, cast to the initializer's dtype, in its layout."""
    out = base.astype(np.float32) + to_graph_layout(delta, target)
    return out.astype(_NP[target["dtype"]])


def read_initializers(path, names: set[str]) -> dict[str, np.ndarray]:
    """The named initializers of an ONNX file as numpy arrays (the graph is parsed once and dropped)."""
    model = onnx.load(str(path), load_external_data=True)
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in names}
    missing = names - set(out)
    if missing:
        from sdtrt.errors import LoraError

        raise LoraError(f"{path}: the graph lacks initializers {sorted(missing)[:3]} that the manifest names; re-export")
    return out
