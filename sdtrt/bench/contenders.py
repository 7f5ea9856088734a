"""The contenders: diffusers' ``StableDiffusionPipeline`` (what users run instead) and sdtrt on each backend.

Each contender loads once, then ``generate(batch)`` runs one request with the spec's prompt, seed, steps, size
and scheduler, and returns the images and per-stage times. Stages are timed by wrapping the functions each
pipeline calls (diffusers: ``text_encoder.forward``, ``unet.forward``, ``vae.decode``; sdtrt: the runners'
``run``), so nothing inside the measured request syncs that would not sync anyway. sdtrt's prompt cache is
cleared before each request, so both sides encode the prompt and the negative prompt every time.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.bench.spec import BenchSpec
from sdtrt.bench.timing import CallTimer, durations, install, loop_figures

# our scheduler names -> diffusers classes; the config overrides each name pins come from sdtrt's registry.


@dataclass
class Sample:
    """One request: its images (B, H, W, 3) uint8, wall time, and stage figures in ms (None: not observable)."""

    images: np.ndarray
    e2e_s: float
    stages: dict[str, float | None] = field(default_factory=dict)


class Contender:
    """Base: three call timers and the request loop; subclasses implement ``load`` and ``_call``."""

    kind = ""

    def __init__(self, name: str, spec: BenchSpec, cuda: bool) -> None:
        self.name = name
        self.spec = spec
        self.cuda = cuda
        self.info: dict[str, Any] = {"kind": self.kind, "device": "cuda" if cuda else "cpu"}
        self.text, self.unet, self.vae = CallTimer(cuda), CallTimer(cuda), CallTimer(cuda)
        self._restore: list = []

    def load(self) -> None:
        raise NotImplementedError

    def _call(self, batch: int) -> list:  # PIL images
        raise NotImplementedError

    def _loop_stages(self) -> dict[str, float | None]:
        return loop_figures(self.unet.spans_ms(), self.unet.host_spans_ms())

    def _per_step(self, e2e_s: float) -> dict[str, float | None]:
        """The request split per denoising step into UNet time (every UNet call, PNDM's extra one included) and
        the rest: everything that is not one of the three models (tokenizing, latents, CFG, scheduler math,
        input copies, post-processing to PIL), i.e. what the runtime around the models costs. None where the
        UNet calls are not observable (a replayed CUDA graph)."""
        if not self.unet.calls:
            return {"unet_ms_per_step": None, "overhead_ms_per_step": None}
        models = [sum(durations(t.spans_ms())) for t in (self.text, self.unet, self.vae)]
        steps = self.spec.steps
        return {"unet_ms_per_step": models[1] / steps, "overhead_ms_per_step": (e2e_s * 1e3 - sum(models)) / steps}

    def generate(self, batch: int) -> Sample:
        for t in (self.text, self.unet, self.vae):
            t.reset()
        t0 = time.perf_counter()
        pil = self._call(batch)
        e2e = time.perf_counter() - t0
        if self.cuda:
            torch.cuda.synchronize()  # after the clock stopped: the events must be complete to be read
        stages = {
            "text_encoder_ms": float(sum(durations(self.text.spans_ms()))) if self.text.calls else None,
            **self._loop_stages(),
            "vae_decoder_ms": float(sum(durations(self.vae.spans_ms()))) if self.vae.calls else None,
            **self._per_step(e2e),
        }
        return Sample(np.stack([np.asarray(im.convert("RGB")) for im in pil]), e2e, stages)

    def close(self) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()


# -- diffusers ---------------------------------------------------------------------------------------------------
def _diffusers_scheduler(config: dict, name: str):
    import diffusers

    from sdtrt.runtime import schedulers

    return getattr(diffusers, schedulers.DIFFUSERS_CLASSES[name]).from_config({**config, **schedulers.get_scheduler(name).overrides})


class DiffusersContender(Contender):
    """diffusers' own pipeline for the checkpoint (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) with
    SDPA attention, fp16 on CUDA (fp32 with ``dtype``), optionally with
    ``torch.compile`` of the UNet forward and the VAE decode (diffusers' own recipe)."""

    kind = "diffusers"

    def __init__(self, name: str, spec: BenchSpec, cuda: bool, source: Path, scheduler: str, *,
                 dtype: torch.dtype | None = None, compile: bool = False) -> None:
        super().__init__(name, spec, cuda)
        self.source = Path(source)
        self.scheduler = scheduler
        self.dtype = dtype or (torch.float16 if cuda else torch.float32)
        self.compile = compile
        self.pipe = None
        self.info.update(dtype=str(self.dtype).removeprefix("torch."), compile=compile,
                         compile_mode=spec.compile_mode if compile else None, scheduler=scheduler)

    def load(self) -> None:
        import diffusers
        from diffusers.models.attention_processor import AttnProcessor2_0

        common = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        index = self.source / "model_index.json"
        if index.is_file():  # the folder's own pipeline class: StableDiffusionPipeline, StableDiffusionXLPipeline, ...
            cls = getattr(diffusers, json.loads(index.read_text())["_class_name"], None)
            if cls not in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline):
                from sdtrt.errors import UsageError

                raise UsageError(f"{self.source}: a {json.loads(index.read_text())['_class_name']} folder is not "
                                 "benched (txt2img needs an SD or SDXL base model)")
            if cls is not diffusers.StableDiffusionPipeline:
                common = {}  # SDXL pipelines have no safety checker
            pipe = cls.from_pretrained(self.source, local_files_only=True, **common)
        else:  # a single-file checkpoint: sdtrt's loader resolves its layout and configs offline
            from sdtrt.checkpoint.loader import load_checkpoint

            ck = load_checkpoint(self.source, allow_pickle=self.source.suffix in (".ckpt", ".pt", ".pth"))
            pipe = pipeline_from_checkpoint(ck, _diffusers_scheduler(ck.scheduler_config, self.scheduler))
        pipe.scheduler = _diffusers_scheduler(dict(pipe.scheduler.config), self.scheduler)
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
        pipe = pipe.to(device="cuda" if self.cuda else "cpu", dtype=self.dtype)  # the weights are stored in fp32
        pipe.set_progress_bar_config(disable=True)
        self.info.update(attention="SDPA (AttnProcessor2_0)", pipeline=type(pipe).__name__,
                         guidance=self.spec.guidance)
        if self.compile:
            # dynamic=False: one static graph per batch size, as a user serving fixed shapes would compile
            opts = {"mode": self.spec.compile_mode, "fullgraph": True, "dynamic": False}
            pipe.unet.forward = torch.compile(pipe.unet.forward, **opts)
            pipe.vae.decode = torch.compile(pipe.vae.decode, **opts)
        encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        self._restore += [install(e, "forward", self.text) for e in encoders]
        self._restore += [install(pipe.unet, "forward", self.unet),
                          install(pipe.vae, "decode", self.vae)]
        self.pipe = pipe

    def _call(self, batch: int) -> list:
        s = self.spec
        # guidance_scale always given: diffusers' defaults differ per pipeline (SD 7.5, SDXL 5.0)
        out = self.pipe(s.prompt, negative_prompt=s.negative_prompt or None, num_inference_steps=s.steps,
                        guidance_scale=s.guidance, height=s.height, width=s.width, num_images_per_prompt=batch,
                        generator=torch.Generator("cpu").manual_seed(s.seed))
        return out.images

    def close(self) -> None:
        super().close()
        self.pipe = None


def pipeline_from_checkpoint(ck, scheduler):
    """diffusers' txt2img pipeline for sdtrt's loaded ``Checkpoint`` (a single file, which diffusers cannot read
    offline): ``StableDiffusionXLPipeline`` for SDXL base, ``StableDiffusionPipeline`` for SD 1.x/2.x."""
    import diffusers

    from sdtrt.errors import UsageError

    if ck.family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=ck.vae, text_encoder=ck.text_encoder, text_encoder_2=ck.text_encoder_2, tokenizer=ck.tokenizer,
            tokenizer_2=ck.tokenizer_2, unet=ck.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=bool(ck.pipeline_config.get("force_zeros_for_empty_prompt", True)))
    if ck.family in ("sd1", "sd2"):
        return diffusers.StableDiffusionPipeline(
            vae=ck.vae, text_encoder=ck.text_encoder, tokenizer=ck.tokenizer, unet=ck.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    raise UsageError(f"{ck.source}: a {ck.family} checkpoint is not benched (txt2img needs an SD or SDXL base model)")


# -- sdtrt -------------------------------------------------------------------------------------------------------
def load_pipeline(workdir: Path, backend: str, threads: int | None, *, allow_spinning: bool = False):
    """``Pipeline.load``, except that ONNX Runtime gets ``threads`` intra-op threads (``Pipeline.load`` takes no
    thread count; the backend does) and, to measure what it costs, ``allow_spinning``."""
    from sdtrt.runtime.pipeline import Pipeline, check_components

    workdir = Path(workdir)
    if backend != "onnxruntime" or (threads is None and not allow_spinning):
        return Pipeline.load(workdir, backend=backend)
    from sdtrt.export.manifest import read_manifest
    from sdtrt.runtime.backends import resolve_backend_name
    from sdtrt.runtime.backends.ort_backend import OrtBackend

    manifest = read_manifest(workdir)
    check_components(workdir, manifest)
    _, device = resolve_backend_name("onnxruntime", workdir)
    backend = OrtBackend(workdir, manifest, device, threads=threads or 0, allow_spinning=allow_spinning)
    return Pipeline.on_backend(workdir, manifest, backend)


class SdtrtContender(Contender):
    """sdtrt's ``Pipeline`` on one backend; ``graph``: the whole loop replayed as one CUDA graph."""

    kind = "sdtrt"

    def __init__(self, name: str, spec: BenchSpec, cuda: bool, workdir: Path, backend: str, graph: bool, *,
                 allow_spinning: bool = False) -> None:
        super().__init__(name, spec, cuda)
        self.allow_spinning = allow_spinning  # ONNX Runtime's threads spin-wait: only to measure what that costs
        self.workdir = Path(workdir)
        self.backend = backend
        self.graph = graph
        self.replay = CallTimer(cuda)
        self._wrapped: set[int] = set()
        self._replay_evals = 1
        self.pipe = None
        self.info.update(backend=backend, cuda_graph=graph)

    def load(self) -> None:
        pipe = load_pipeline(self.workdir, self.backend, self.spec.threads, allow_spinning=self.allow_spinning)
        if self.graph and not pipe.use_cuda_graph:
            raise RuntimeError(f"the {pipe.backend.name} backend cannot be captured in a CUDA graph here")
        pipe.use_cuda_graph = self.graph
        self._restore += [install(e.runner, "run", self.text) for e in pipe.text_encoders.values()]
        self._restore += [install(pipe._unet, "run", self.unet), install(pipe._decoder, "run", self.vae)]
        dtype = getattr(pipe.backend, "dtype", None)  # the torch backend computes natively, whatever the export's
        self.info.update(backend=pipe.backend.name, precision=pipe.manifest.get("precision"),
                         compute_dtype=None if dtype is None else str(dtype).removeprefix("torch."),
                         scheduler=self.spec.scheduler or pipe.default_scheduler)
        self.pipe = pipe

    def _wrap_new_graphs(self) -> None:
        """Time the replay of every loop captured so far (the pipeline captures on a key's first request)."""
        for st in self.pipe._loops.values():
            graph = st.graph
            if graph is None or id(graph) in self._wrapped:
                continue
            timed, evals = self.replay.wrap(graph.replay), int(st.tables.num_evals - st.key.start)

            def replay(timed=timed, evals=evals) -> None:
                self._replay_evals = evals
                timed()

            graph.replay = replay
            self._restore.append(lambda graph=graph: delattr(graph, "replay"))
            self._wrapped.add(id(graph))

    def _call(self, batch: int) -> list:
        s = self.spec
        self.replay.reset()
        self._wrap_new_graphs()
        self.pipe.clear_text_cache()
        result = self.pipe(s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.steps,
                           guidance_scale=s.guidance, seed=s.seed, num_images_per_prompt=batch, height=s.height,
                           width=s.width, scheduler=s.scheduler)
        return result.images

    def _loop_stages(self) -> dict[str, float | None]:
        if not self.replay.calls:
            return super()._loop_stages()
        (dev,), (host,) = durations(self.replay.spans_ms()), durations(self.replay.host_spans_ms())
        n = self._replay_evals
        return {"unet_eval_ms": None, "scheduler_step_ms": None, "step_ms": dev / n, "host_step_ms": host / n}

    def close(self) -> None:
        super().close()
        self.pipe = None


# -- which contenders run here -----------------------------------------------------------------------------------
def unavailable_reason(name: str, workdir: Path, source: Path, cuda: bool) -> str | None:
    """Why ``name`` cannot run on this machine, or None."""
    if name.endswith("-graph") and not cuda:
        return "CUDA graphs need an NVIDIA GPU"
    if name.startswith("sdtrt-tensorrt"):
        if not cuda:
            return "TensorRT needs an NVIDIA GPU"
        from sdtrt.export.manifest import read_manifest
        from sdtrt.runtime.backends.trt_backend import engines_ready

        reason = engines_ready(workdir, read_manifest(workdir))  # flavour installed, every engine there and fresh
        if reason is not None:
            return f"{reason} (run `sdtrt build {workdir}`)"
    if name == "sdtrt-onnxruntime" and cuda:
        from sdtrt.runtime.backends import resolve_backend_name

        if resolve_backend_name("onnxruntime", workdir)[1].type != "cuda":
            return "onnxruntime has no CUDA execution provider here (install onnxruntime-gpu); it would run on the CPU"
    if name.startswith("sdtrt-torch") and not source.exists():
        return f"the torch backend runs the source checkpoint, {source}, which is missing"
    if name.startswith("diffusers") and not source.exists():
        return f"diffusers needs the source checkpoint, {source}, which is missing"
    return None


def default_contenders(spec: BenchSpec, cuda: bool) -> tuple[str, ...]:
    names = ["diffusers"]
    if cuda and not spec.skip_compile:
        names.append("diffusers-compile")
    names += ["sdtrt-tensorrt", "sdtrt-tensorrt-graph", "sdtrt-onnxruntime", "sdtrt-torch"] if cuda else \
        ["sdtrt-onnxruntime", "sdtrt-torch"]
    if cuda:
        names.append("sdtrt-torch-graph")
    return tuple(names)


def make_contender(name: str, spec: BenchSpec, cuda: bool, workdir: Path, source: Path, scheduler: str) -> Contender:
    if name.startswith("diffusers"):
        return DiffusersContender(name, spec, cuda, source, scheduler, compile=name == "diffusers-compile")
    backend = name.removeprefix("sdtrt-").removesuffix("-graph")
    return SdtrtContender(name, spec, cuda, workdir, backend, graph=name.endswith("-graph"))


@contextlib.contextmanager
def strict_fp32():
    """TF32 off while the fp32 reference runs on CUDA, so it is a true fp32 reference."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
