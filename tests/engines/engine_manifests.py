"""Hand-written manifests in the exporter's format (see sdtrt/export/pipeline.py), for CPU tests of engine logic."""

from __future__ import annotations

import copy
from typing import Any


def _io(name: str, shape: list, dtype: str) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype}


def sd15_manifest(precision: str = "fp16") -> dict[str, Any]:
    """An SD 1.5 export: 512 px native, VAE scale 8, CLIP hidden size 768."""
    f = "float16" if precision == "fp16" else "float32"
    comps = {
        "text_encoder": {
            "inputs": [_io("input_ids", ["B", 77], "int32")],
            "outputs": [_io("last_hidden_state", ["B", 77, 768], f), _io("penultimate_hidden_state", ["B", 77, 768], f)],
        },
        "unet": {
            "inputs": [_io("sample", ["2B", 4, "H", "W"], f), _io("timestep", [1], "float32"),
                       _io("encoder_hidden_states", ["2B", 77, 768], f)],
            "outputs": [_io("latent", ["2B", 4, "H", "W"], f)],
        },
        "vae_decoder": {
            "inputs": [_io("latent", ["B", 4, "H", "W"], f)],
            "outputs": [_io("image", ["B", "8H", "8W", 3], "uint8"), _io("finite", ["B"], "bool")],
        },
        "vae_encoder": {
            "inputs": [_io("image", ["B", "8H", "8W", 3], "uint8")],
            "outputs": [_io("latent_mean", ["B", 4, "H", "W"], f), _io("latent_std", ["B", 4, "H", "W"], f)],
        },
    }
    for name, c in comps.items():
        c["files"] = [{"path": f"onnx/{name}.onnx", "sha256": f"{name}-sha", "bytes": 1}]
        c["precision"] = precision
        c["validation"] = None
    return {
        "format_version": 1,
        "model": {"vae_scale_factor": 8, "default_size": 512, "latent_channels": 4, "max_length": 77},
        "components": comps,
    }


def sdxl_manifest(precision: str = "fp16", family: str = "sdxl") -> dict[str, Any]:
    """A full-size SDXL export as the exporter writes it (1024 px native, CLIP ViT-L 768 + bigG 1280 = 2048, pooled
    1280, six time ids, the UNet's text axis 77T, the VAE in fp32), or its refiner (``family="sdxl-refiner"``:
    bigG only, 1280 wide, five time ids)."""
    f = "float16" if precision == "fp16" else "float32"
    refiner = family == "sdxl-refiner"
    encoders = ["text_encoder_2"] if refiner else ["text_encoder", "text_encoder_2"]
    hidden = 1280 if refiner else 2048
    comps = {
        "text_encoder": {
            "inputs": [_io("input_ids", ["B", 77], "int32")],
            "outputs": [_io("penultimate_unnormed", ["B", 77, 768], f)],
        },
        "text_encoder_2": {
            "inputs": [_io("input_ids", ["B", 77], "int32")],
            "outputs": [_io("penultimate_unnormed", ["B", 77, 1280], f), _io("text_embeds", ["B", 1280], f)],
        },
        "unet": {
            "inputs": [_io("sample", ["2B", 4, "H", "W"], f), _io("timestep", [1], "float32"),
                       _io("encoder_hidden_states", ["2B", "77T", hidden], f), _io("text_embeds", ["2B", 1280], f),
                       _io("time_ids", ["2B", 5 if refiner else 6], "float32")],
            "outputs": [_io("latent", ["2B", 4, "H", "W"], f)],
        },
        "vae_decoder": {
            "inputs": [_io("latent", ["B", 4, "H", "W"], "float32")],
            "outputs": [_io("image", ["B", "8H", "8W", 3], "uint8"), _io("finite", ["B"], "bool")],
        },
        "vae_encoder": {
            "inputs": [_io("image", ["B", "8H", "8W", 3], "uint8")],
            "outputs": [_io("latent_mean", ["B", 4, "H", "W"], "float32"),
                        _io("latent_std", ["B", 4, "H", "W"], "float32")],
        },
    }
    comps = {k: v for k, v in comps.items() if k in encoders or not k.startswith("text_encoder")}
    for name, c in comps.items():
        c["files"] = [{"path": f"onnx/{name}.onnx", "sha256": f"{name}-sha", "bytes": 1}]
        c["precision"] = "fp32" if name.startswith("vae_") else precision
        c["validation"] = None
    return {
        "format_version": 1,
        "model": {"family": family, "vae_scale_factor": 8, "default_size": 1024, "latent_channels": 4,
                  "max_length": 77, "text_encoders": encoders, "text_hidden_size": hidden, "pooled_dim": 1280,
                  "time_ids": 5 if refiner else 6},
        "components": comps,
    }


def with_onnx_files(manifest: dict[str, Any], component: str, files: list[tuple[str, str]]) -> dict[str, Any]:
    """A copy of ``manifest`` whose ``component`` has other ONNX files: [(path, sha256), ...]."""
    out = copy.deepcopy(manifest)
    out["components"][component]["files"] = [{"path": p, "sha256": h, "bytes": 1} for p, h in files]
    return out
