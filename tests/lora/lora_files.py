"""Random LoRA files for the tests, in kohya/A1111 and diffusers/PEFT layouts, and the tests' own reference merge
into a diffusers pipeline (diffusers' ``load_lora_weights`` needs peft >= 0.22, which is not installable here)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# module name patterns a LoRA of each kind touches (substrings of diffusers' names)
LINEAR_UNET = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
CONV_UNET = ("proj_in", "proj_out", "resnets.0.conv1", "resnets.1.conv2")  # 1x1 and 3x3 (LoCon)
TEXT = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")


def _text_model(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)


def lora_modules(pipe, conv: bool, text: bool) -> dict[str, torch.nn.Module]:
    """``{"unet.<name>" | "text_encoder.text_model.<name>": module}`` of the modules a test LoRA changes."""
    out = {}
    for name, m in pipe.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(name.endswith(p) for p in
                                                                     LINEAR_UNET + (CONV_UNET if conv else ())):
            out[f"unet.{name}"] = m
    if text:
        for name, m in _text_model(pipe.text_encoder).named_modules():
            if isinstance(m, torch.nn.Linear) and any(name.endswith(p) for p in TEXT):
                out[f"text_encoder.text_model.{name}"] = m
    return out


def make_lora(path: Path, modules: dict[str, torch.nn.Module], *, layout: str, rank: int = 4, seed: int = 0,
              alpha: float | None = 2.0, strength: float = 0.6) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Write a random LoRA for ``modules``; returns ``{module key: (down, up, alpha/rank)}`` for the reference
    merge. ``layout``: "kohya" (lora_unet_/lora_te_ flattened names, lora_down/lora_up/alpha) or "peft"
    (unet./text_encoder. dotted names, lora_A/lora_B, alpha only when given)."""
    g = torch.Generator().manual_seed(seed)
    tensors, layers = {}, {}
    for key, m in modules.items():
        w = m.weight
        if w.dim() == 4:
            down = torch.randn(rank, *w.shape[1:], generator=g) / (w[0].numel() ** 0.5)
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
        else:
            down = torch.randn(rank, w.shape[1], generator=g) / (w.shape[1] ** 0.5)
            up = torch.randn(w.shape[0], rank, generator=g)
        up = up * strength * float(w.detach().std())  # a visible change, not a blown-up model
        if layout == "kohya":
            comp, name = key.split(".", 1)
            prefix = "lora_unet_" if comp == "unet" else "lora_te_"
            base = prefix + name.replace(".", "_")
            tensors[f"{base}.lora_down.weight"] = down
            tensors[f"{base}.lora_up.weight"] = up
            if alpha is not None:
                tensors[f"{base}.alpha"] = torch.tensor(alpha)
        else:
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
        layers[key] = (down, up, (alpha if alpha is not None else rank) / rank)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return layers


def merge_into(pipe, loras: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    """Merge ``[(layers, scale), ...]`` into ``pipe``'s weights: W += scale * alpha/rank * up @ down. Returns the
    base weights to restore with ``restore``."""
    modules = {**{f"unet.{n}": m for n, m in pipe.unet.named_modules()},
               **{f"text_encoder.text_model.{n}": m for n, m in _text_model(pipe.text_encoder).named_modules()}}
    saved = {}
    with torch.no_grad():
        for layers, scale in loras:
            for key, (down, up, ratio) in layers.items():
                w = modules[key].weight
                saved.setdefault(key, w.clone())
                delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * ratio * scale
                w += delta
    return saved


def restore(pipe, saved: dict[str, torch.Tensor]) -> None:
    modules = {**{f"unet.{n}": m for n, m in pipe.unet.named_modules()},
               **{f"text_encoder.text_model.{n}": m for n, m in _text_model(pipe.text_encoder).named_modules()}}
    with torch.no_grad():
        for key, w in saved.items():
            modules[key].weight.copy_(w)
