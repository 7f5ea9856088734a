"""LoRA files: kohya / A1111 and diffusers / PEFT ``.safetensors``, linear and convolution (LoCon) layers.

Each layer is ``up @ down`` times ``alpha / rank`` (alpha = rank when the file stores none). Keys are kept as the
file spells them, without the layer suffix; ``deltas`` maps them to the model's modules.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtrt.errors import LoraError

# suffix -> role; kohya/A1111 first, then diffusers/PEFT and diffusers' older attention-processor spelling
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
)


@dataclass(frozen=True)
class LoraLayer:
    """One module's low-rank update: ``down`` (r, in) or (r, in, kh, kw), ``up`` (out, r) or (out, r, 1, 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """(alpha / rank) * up @ down in float32, shaped like the module's weight."""
        scale = (self.alpha if self.alpha is not None else self.rank) / self.rank
        d = self.up.flatten(1).float() @ self.down.flatten(1).float()  # (out, in * kh * kw)
        return (d * scale).reshape(self.weight_shape)


@dataclass(frozen=True)
class LoraFile:
    name: str  # the file's stem: what A1111 and the server call it
    path: Path
    sha256: str
    layers: dict[str, LoraLayer]  # file key without suffix ("lora_unet_..." or "unet.down_blocks...") -> layer

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the file's sha256, as A1111 writes it in ``Lora hashes``."""
        return self.sha256[:12]


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA ``.safetensors`` file; ``LoraError`` with one line for anything wrong with it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files are read as .safetensors only (pickles can run code)")
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    data = path.read_bytes()
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unsupported: list[str] = []
    for key, t in tensors.items():
        for suffix, role in SUFFIXES:
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[role] = t
                break
        else:
            unsupported.append(key)
    if unsupported:
        raise LoraError(f"{path}: {len(unsupported)} tensors are not LoRA up/down/alpha weights (e.g. "
                        f"{unsupported[0]!r}): only plain LoRA and LoCon are supported, not LoHa, LoKr or DoRA")
    if not parts:
        raise LoraError(f"{path}: no LoRA weights in the file")
    layers = {}
    for key, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraError(f"{path}: {key} has no {'up' if 'down' in p else 'down'} weight")
        down, up = p["down"], p["up"]
        ok = (down.dim() == up.dim() == 2) or (down.dim() == up.dim() == 4 and tuple(up.shape[2:]) == (1, 1))
        if not ok or up.shape[1] != down.shape[0]:
            raise LoraError(f"{path}: {key} has down {tuple(down.shape)} and up {tuple(up.shape)}, not a low-rank pair")
        alpha = float(p["alpha"].float().item()) if "alpha" in p else None
        layers[key] = LoraLayer(down, up, alpha)
    return LoraFile(path.stem, path.resolve(), hashlib.sha256(data).hexdigest(), layers)
