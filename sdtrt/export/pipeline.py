"""``sdtrt export``: a loaded checkpoint -> a WORKDIR of validated ONNX graphs, tokenizer, scheduler and manifest.

Everything is staged in a hidden folder inside WORKDIR and moved into place only after every graph passed
validation; the previous manifest is removed before the first file moves and the new one is written last, so an
interrupted or failed export never leaves a manifest that looks complete (and a failed one leaves no new files).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import sdtrt
from sdtrt.checkpoint.model import TOKENIZER_DIRS, Checkpoint
from sdtrt.export.component import ComponentExport
from sdtrt.export.graph import export_graph, release_memory
from sdtrt.export.manifest import FORMAT_VERSION, MANIFEST
from sdtrt.export.modules import component_exports, model_info
from sdtrt.export.spec import ExportSpec
from sdtrt.export.validate import compare_with_onnx, raise_if_failed, reference_cases
from sdtrt.fsutil import sha256_file, write_json_atomic
from sdtrt.lora.targets import LORA_ROOTS, fingerprint, map_initializers

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    out = {"sdtrt": sdtrt.__version__}
    for pkg in ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "onnx-graphsurgeon"):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _dtype_name(dtype: str, precision: str) -> str:
    if dtype == "float":
        return "float16" if precision == "fp16" else "float32"
    return dtype


def _source_info(ckpt: Checkpoint) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": str(ckpt.source.resolve()),
        "format": ckpt.format,
        "arch": ckpt.arch,
        "family": ckpt.family,
        "prediction_type": ckpt.prediction_type,
    }
    if ckpt.source.is_file():
        info["sha256"] = sha256_file(ckpt.source)
    return info


def _previous_entries(workdir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    try:
        old = json.loads((workdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    same = old.get("format_version") == FORMAT_VERSION and old.get("source", {}).get("path") == manifest["source"]["path"]
    if not same:
        return {}
    return {
        name: entry
        for name, entry in old.get("components", {}).items()
        if all((workdir / f["path"]).is_file() for f in entry.get("files", []))
    }


def _release(done: ComponentExport, later: list[ComponentExport]) -> None:
    """Free the weights of ``done``'s module (moved to the meta device) unless a later component shares them (the
    two VAE graphs share one VAE)."""
    shared = {id(p) for c in later for p in c.module.parameters()}
    if not any(id(p) in shared for p in done.module.parameters()):
        done.module.to("meta")


def export_checkpoint(ckpt: Checkpoint, workdir: str | Path, spec: ExportSpec, *, progress: bool = True,
                      load_options: dict[str, Any] | None = None, release: bool = False) -> dict[str, Any]:
    """Export ``spec.components`` of ``ckpt`` (default: every component of its family) into ``workdir``; returns the manifest written. ``load_options``
    (``config_dir``, ``allow_pickle``) are how the checkpoint was loaded, recorded so the torch backend can load
    it the same way. ``release``: the caller hands ``ckpt`` over: each torch module's weights are freed once its
    graph is traced and its references computed (a full-size export then holds one model at a time), and ``ckpt``
    must not be used afterwards."""
    spec = spec.resolved(ckpt.family)  # checked before any file is written
    info = model_info(ckpt)  # read before any module is released
    tokenizer_dirs = [TOKENIZER_DIRS[n] for n in info["text_encoders"]]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=workdir))
    try:
        comps = component_exports(ckpt, spec.components)
        entries: dict[str, Any] = {}
        bar = tqdm(total=len(comps) * (2 if spec.validate else 1), desc="export", unit="step", disable=not progress)
        for i, comp in enumerate(comps):
            precision = spec.precision_of(comp.name)
            bar.set_description(f"export {comp.name} ({precision})")
            # the torch references first: with ``release`` the module is gone before ONNX Runtime loads the graph
            cases = reference_cases(comp, precision) if spec.validate else []
            trace_args = comp.make_inputs(comp.check_sizes[0], torch.Generator().manual_seed(0))
            later = comps[i + 1:]
            # LoRA map: the weights' digests now (the module may be freed once traced), matched in the final graph
            lora: dict[str, Any] = {}
            prints = fingerprint(comp.name, comp.module) if comp.name in LORA_ROOTS else None
            files = export_graph(comp.module, trace_args, comp.io, staging / "onnx" / f"{comp.name}.onnx",
                                 precision=precision, opset=spec.opset,
                                 traced=(lambda comp=comp, later=later: _release(comp, later)) if release else None,
                                 inspect=(lambda model, p=prints, out=lora: out.update(map_initializers(model, p)))
                                 if prints is not None else None)
            del prints
            del trace_args
            bar.update(1)
            validation = None
            if spec.validate:
                log.info("validating %s", comp.name)
                bar.set_description(f"validate {comp.name}")
                results = compare_with_onnx(comp, files[0], precision, cases)
                del cases
                validation = [{e.output: e.as_dict() for e in errs} for errs in results]
                for errs in results:
                    for e in errs:
                        log.info("%s %s %s: %.3g (tolerance %g)", comp.name, e.output, list(e.shape), e.metric, e.tolerance)
                raise_if_failed(comp.name, precision, results)
                bar.update(1)
            entries[comp.name] = {
                "files": [{"path": f"onnx/{f.name}", "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files],
                "precision": precision,
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": _dtype_name(s.dtype, precision)} for s in comp.inputs],
                "outputs": [{"name": s.name, "shape": list(s.shape), "dtype": _dtype_name(s.dtype, precision)} for s in comp.outputs],
                "dynamic_axes": {k: {str(i): n for i, n in v.items()} for k, v in comp.io.dynamic_axes.items()},
                "validation": validation,
                **({"lora": lora} if lora else {}),
            }
            release_memory()  # ONNX Runtime's session and the torch activations of this component
        bar.close()

        for sub in tokenizer_dirs:  # the family's tokenizers, whichever components this call exports
            getattr(ckpt, sub).save_pretrained(str(staging / sub))
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(ckpt.scheduler_config, indent=2) + "\n")

        manifest = {
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {**_source_info(ckpt), "load_options": dict(load_options or {})},
            "versions": _versions(),
            "opset": spec.opset,
            "precision": {"default": spec.precision, "vae": spec.vae_precision or spec.precision},
            "model": info,
            "components": entries,
        }

        # A partial export (--components) keeps the other components of an earlier export of the same source.
        previous = _previous_entries(workdir, manifest)
        manifest["components"] = {**{k: v for k, v in previous.items() if k not in entries}, **entries}

        # Commit: old manifest out first, files in, new manifest last.
        (workdir / MANIFEST).unlink(missing_ok=True)
        (workdir / "onnx").mkdir(exist_ok=True)
        for name, entry in entries.items():
            for stale in (workdir / "onnx").glob(f"{name}.onnx*"):
                stale.unlink()
            for f in entry["files"]:
                os.replace(staging / f["path"], workdir / f["path"])
        for sub in (*TOKENIZER_DIRS.values(), "scheduler"):  # another family's tokenizer folders go too
            if (workdir / sub).exists():
                shutil.rmtree(workdir / sub)
            if (staging / sub).exists():
                os.replace(staging / sub, workdir / sub)
        write_json_atomic(workdir / MANIFEST, manifest)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
