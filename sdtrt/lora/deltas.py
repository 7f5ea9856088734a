"""A request's LoRA set -> one float32 delta per module: W' = W + sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i.

Checked at the edge (``LoraLibrary.check``): every file must exist and parse, every one of its layers must match a
module this export mapped, with the same weight shape, and each scale must lie in [-MAX_SCALE, MAX_SCALE]. The
kohya key of a module is built from the model's own module names (``lora_unet_`` + name with ``.`` -> ``_``), as
diffusers' converters do, so no hand-written table can drift from the model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtrt.errors import LoraError
from sdtrt.lora.files import LoraFile, read_lora
from sdtrt.lora.targets import KOHYA_PREFIXES, LORA_ROOTS, PEFT_PREFIXES

MAX_SCALE = 4.0

LoraSpec = tuple[tuple[str, float], ...]  # ((path, scale), ...) as a request carries it
Deltas = dict[str, dict[str, torch.Tensor]]  # component -> module -> float32 delta in the weight's shape


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's ``--lora``) -> (path, scale); scale 1.0 when absent."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass  # a colon inside the path itself
    return text, 1.0


class LoraLibrary:
    """Parsed LoRA files (cached by path, size and mtime), checked against one export's LoRA map."""

    def __init__(self, manifest: Mapping[str, Any]) -> None:
        comps = manifest["components"]
        self._maps = {c: comps[c].get("lora") for c in LORA_ROOTS if c in comps}
        self._index: dict[str, tuple[str, str]] = {}  # file key -> (component, module)
        for comp, lmap in self._maps.items():
            if lmap is None:
                continue
            kohya = [p for p, c in KOHYA_PREFIXES.items() if c == comp]
            peft = [p for p, c in PEFT_PREFIXES.items() if c == comp]
            for name in (*lmap["targets"], *lmap["unmapped"]):
                for p in kohya:
                    self._index[p + name.replace(".", "_")] = (comp, name)
                for p in peft:
                    self._index[p + name] = (comp, name)
        self._files: dict[tuple, LoraFile] = {}
        self._lock = threading.Lock()  # the server checks on HTTP threads while the worker computes deltas

    def load(self, path: str | Path) -> LoraFile:
        p = Path(path)
        try:
            st = p.stat()
            key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        with self._lock:
            hit = self._files.get(key) if key else None
        if hit is not None:
            return hit
        f = read_lora(p)
        with self._lock:
            self._files[key] = f
            while len(self._files) > 32:
                self._files.pop(next(iter(self._files)))
        return f

    def check(self, loras: Sequence[tuple[str, float]]) -> LoraSpec:
        """``loras`` normalised (resolved paths, float scales), or ``LoraError`` naming the first problem."""
        out = []
        for item in loras:
            try:
                path, scale = item
            except (TypeError, ValueError):
                raise LoraError(f"a LoRA is given as (path, scale), got {item!r}") from None
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                    or abs(scale) > MAX_SCALE:
                raise LoraError(f"LoRA {Path(str(path)).stem}: scale must be a number in [-{MAX_SCALE:g}, "
                                f"{MAX_SCALE:g}], got {scale!r}")
            f = self.load(path)
            self._match(f)
            out.append((str(f.path), float(scale)))
        return tuple(out)

    def _match(self, f: LoraFile) -> dict[str, tuple[str, str]]:
        if not any(self._maps.values()):
            raise LoraError("this export has no LoRA map (exported before sdtrt applied LoRAs); run `sdtrt export` "
                            "again to use LoRAs")
        matched = {k: self._index[k] for k in f.layers if k in self._index}
        if len(matched) < len(f.layers):
            miss = next(k for k in f.layers if k not in self._index)
            raise LoraError(f"LoRA {f.name}: {len(matched)} of {len(f.layers)} layers match this model's modules "
                            f"(e.g. {miss!r} matches none): made for another architecture?")
        for key, (comp, name) in matched.items():
            lmap = self._maps[comp]
            if name in lmap["unmapped"]:
                raise LoraError(f"LoRA {f.name}: {comp} module {name} cannot be changed in this export "
                                f"({lmap['unmapped'][name]})")
            want = tuple(lmap["targets"][name]["shape"])
            if f.layers[key].weight_shape != want:
                raise LoraError(f"LoRA {f.name}: {key} makes a {f.layers[key].weight_shape} update for {comp} "
                                f"module {name}, whose weight is {want}: made for another architecture?")
        return matched

    def files(self, loras: LoraSpec) -> list[LoraFile]:
        return [self.load(p) for p, _ in loras]

    def key(self, loras: LoraSpec) -> tuple:
        """What identifies the weights a LoRA set gives: file contents and scales, in order."""
        return tuple((self.load(p).sha256, s) for p, s in loras)

    def deltas(self, loras: LoraSpec) -> LoraDeltas:
        """The summed float32 delta per changed module, per component."""
        out: Deltas = {}
        for path, scale in loras:
            f = self.load(path)
            for key, (comp, name) in self._match(f).items():
                d = f.layers[key].delta() * scale
                comp_out = out.setdefault(comp, {})
                comp_out[name] = comp_out[name] + d if name in comp_out else d
        return LoraDeltas(self.key(loras), out)

    def targets(self, component: str) -> Mapping[str, Any]:
        """The manifest's ``targets`` of ``component`` (module -> initializer, dtype, layout, shape)."""
        lmap = self._maps.get(component)
        return lmap["targets"] if lmap else {}


@dataclass(frozen=True)
class LoraDeltas:
    """What a backend applies: ``key`` identifies the LoRA set (file hashes and scales; ``()`` is the base model),
    ``by_component`` its summed deltas (component -> module -> float32 delta in the weight's shape)."""

    key: tuple = ()
    by_component: Deltas = field(default_factory=dict)


BASE = LoraDeltas()
