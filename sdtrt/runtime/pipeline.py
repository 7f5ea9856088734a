"""The Stable Diffusion pipeline over a WORKDIR: text encoding, the denoising loop, decoding.

Seeds mean what they mean in diffusers: the initial latents are drawn from a CPU ``torch.Generator`` seeded with
the request's seed, exactly as ``StableDiffusionPipeline`` draws them, and stochastic schedulers' step noise is
drawn from the same generator afterwards, one tensor per step in diffusers' order; all of it before the loop, so
the loop itself never touches the host. Same checkpoint, seed, scheduler and steps: the same image as diffusers.

Per request: (1) the model family (``sdtrt.runtime.families``) turns prompts into the UNet's static conditioning
inputs (text embeddings LRU-cached per prompt), (2) latents and step noise, (3) the loop over static buffers,
captured in one CUDA graph per ``LoopKey`` where the backend allows, (4) decode to uint8 pixels, (5) the finiteness
checks and the copy of the pixels. The loop is the same for every family.

Prompts of several 75-token chunks make the UNet's text axis 77 * k. When the prompt and the negative prompt have
different chunk counts, the UNet runs their rows in separate calls at their own lengths, as A1111 does by default
(its "pad prompt/negative prompt to be same length" option is off by default): one call per distinct length. The loop itself never waits on the host; the pipeline
synchronises only between stages, for the per-stage timings.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.errors import SdtrtError, ShapeError, UsageError
from sdtrt.export.manifest import read_manifest
from sdtrt.lora.deltas import BASE, LoraLibrary
from sdtrt.runtime import img2img, infotext, png, schedulers
from sdtrt.runtime.backends import Backend, load_backend
from sdtrt.runtime.families import TOKENIZER_DIRS, TextEncoder, make_family, text_encoder_names
from sdtrt.runtime.graphs import LoopGraph, LoopKey
from sdtrt.runtime.request import MAX_BATCH, GenerateRequest, batch_key
from sdtrt.runtime.schedulers.tables import at

log = logging.getLogger(__name__)

LOOP_CACHE_SIZE = 8  # loop states (static buffers + CUDA graph) kept; the least recently used beyond are freed
COMPONENTS_NEEDED = ("unet", "vae_decoder")  # and the family's text encoders (manifest "text_encoders")
CHUNK = 77  # tokens per prompt chunk: the UNet's text axis is CHUNK * k


SCHEDULER_NAMES: tuple[str, ...] = tuple(schedulers.SCHEDULERS)


def check_components(workdir: Path, manifest: Mapping) -> None:
    """``UsageError`` unless the export has every graph generation needs."""
    needed = (*text_encoder_names(manifest["model"]), *COMPONENTS_NEEDED)
    missing = [c for c in needed if c not in manifest["components"]]
    if missing:
        raise UsageError(f"{workdir}: the export lacks {', '.join(missing)}; run `sdtrt export` with all components")


class NonFiniteError(SdtrtError):
    """NaN or inf appeared in a stage's output (typically an fp16 overflow)."""


@dataclass(frozen=True)
class Result:
    images: list  # PIL images
    timings: dict[str, float]  # seconds per stage: text_encoder, denoise, vae_decoder, total
    request: GenerateRequest  # with every default filled in
    backend: str
    infotexts: list[str]  # A1111-style "parameters" text per image
    batch_rows: int = 1  # images in the pass that made these (more than ``request.batch`` when micro-batched)

    def save(self, path: str | Path) -> list[Path]:
        """Write the images as PNGs with their A1111 ``parameters`` text (``png.save_result``: atomically)."""
        return png.save_result(self, path)


@dataclass
class _UNetPass:
    """One UNet call per evaluation: the rows (of the loop's R = 2B or B) it computes, at one text length."""

    dims: dict[str, int]
    inputs: dict[str, torch.Tensor]  # the runner's static buffers at ``dims``
    outputs: dict[str, torch.Tensor]
    rows: torch.Tensor | None  # (n,) long: which of the R rows, on the device; None: all R rows, in order
    src: torch.Tensor | None  # (n,) long: the latent row each of those rows reads (row % B)
    row_list: tuple[int, ...]


@dataclass
class _LoopState:
    """Static buffers of one LoopKey; the loop reads and writes only these."""

    key: LoopKey
    tables: Any
    x: torch.Tensor  # (B, 4, h, w) float32 latents
    noise: torch.Tensor  # (E, B, 4, h, w) float32 step noise (E=0 rows when the scheduler needs none)
    history: torch.Tensor | None
    guidance: torch.Tensor  # () float32
    passes: list[_UNetPass]
    out: torch.Tensor | None  # (R, 4, h, w) float32: the passes' predictions gathered, when there are several
    graph: LoopGraph | None = None
    capture_failed: bool = False  # capture failed once (out of memory, an uncapturable enqueue): this key stays eager


class Pipeline:
    """``Pipeline.load(workdir, backend="auto")``, then ``pipe(prompt, num_inference_steps=..., ...)``."""

    def __init__(self, workdir: Path, manifest: Mapping, backend: Backend, tokenizers: Mapping[str, Any],
                 scheduler_config: dict) -> None:
        """``tokenizers``: one per text encoder component of the export (``text_encoder``, ``text_encoder_2``)."""
        self.workdir = workdir
        self.manifest = manifest
        self.backend = backend
        self.device = backend.device
        self.scheduler_config = scheduler_config
        self.model = manifest["model"]
        self.default_scheduler = schedulers.name_for_config(scheduler_config)  # the checkpoint's own
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with self._stream_context():  # backends that bind a stream at creation (ORT's CUDA EP) get ours
            self.text_encoders = {name: TextEncoder(name, backend.runner(name), tokenizers[name])
                                  for name in text_encoder_names(self.model)}
            self._unet = backend.runner("unet")
            self._decoder = backend.runner("vae_decoder")
        self.family = make_family(self.model, self.text_encoders)
        self.model_facts = infotext.model_facts(manifest, backend.name)
        ehs = next(s for s in manifest["components"]["unet"]["inputs"] if s["name"] == "encoder_hidden_states")
        self._one_chunk = isinstance(ehs["shape"][1], int)  # exported before the UNet's text axis was dynamic
        self._encoder = None  # img2img only: made on first use
        self._loops: OrderedDict[LoopKey, _LoopState] = OrderedDict()  # LRU, at most LOOP_CACHE_SIZE
        self.use_cuda_graph = backend.capturable and self.device.type == "cuda"
        self.loras = LoraLibrary(manifest)
        self._lora_key: tuple | None = ()  # the LoRA set the backend's weights hold now; () = the base model

    @property
    def model_name(self) -> str:
        """What the checkpoint is called in infotexts and APIs: its architecture, or its file or folder name."""
        return str(self.manifest["source"].get("arch") or Path(self.manifest["source"]["path"]).name)

    @property
    def tokenizer(self) -> Any:
        """The first text encoder's tokenizer."""
        return next(iter(self.text_encoders.values())).tokenizer

    def clear_text_cache(self) -> None:
        for encoder in self.text_encoders.values():
            encoder.clear()

    @classmethod
    def load(cls, workdir: str | Path, backend: str = "auto") -> Pipeline:
        workdir = Path(workdir)
        manifest = read_manifest(workdir)
        check_components(workdir, manifest)
        return cls.on_backend(workdir, manifest, load_backend(backend, workdir, manifest))

    @classmethod
    def on_backend(cls, workdir: Path, manifest: Mapping, backend: Backend) -> Pipeline:
        """A pipeline over an export whose ``backend`` the caller made (``check_components`` first)."""
        from sdtrt.checkpoint.tokenizer import load_tokenizer

        tokenizers = {name: load_tokenizer(workdir / TOKENIZER_DIRS[name]) for name in text_encoder_names(manifest["model"])}
        scheduler_config = json.loads((workdir / "scheduler" / "scheduler_config.json").read_text())
        return cls(workdir, manifest, backend, tokenizers, scheduler_config)

    # -- public API ---------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        prompt_syntax: str = "a1111",
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        schedule_type: str | None = None,
        eta: float | None = None,
        clip_skip: int = 1,
        image: Any = None,
        strength: float = 0.75,
        loras: Sequence[tuple[str, float]] = (),
    ) -> Result:
        """Shaped like diffusers' call; returns images and per-stage timings. ``loras``: (path, scale) pairs,
        applied for this call only (the next call without them gets exactly the base model's image)."""
        return self.generate(GenerateRequest(
            prompt=prompt, negative_prompt=negative_prompt, prompt_syntax=prompt_syntax, steps=num_inference_steps,
            guidance=guidance_scale,
            scheduler=scheduler, schedule_type=schedule_type, eta=eta, seed=seed, batch=num_images_per_prompt, height=height, width=width,
            clip_skip=clip_skip, init_image=image, strength=strength, loras=tuple(loras),
        ))

    def validate(self, request: GenerateRequest) -> GenerateRequest:
        """``request`` with every default filled in, checked against this checkpoint; ``UsageError`` otherwise.
        Cheap (no device work): servers call it at the edge, before queueing."""
        req = request.validated(default_size=int(self.model["default_size"]), default_scheduler=self.default_scheduler,
                                scheduler_names=SCHEDULER_NAMES)
        req = replace(req, loras=self.loras.check(req.loras))  # files read and matched to this model once, here
        self.family.check(req)
        if self._one_chunk and max(self.family.chunk_counts(req)) > 1:
            raise UsageError(f"{self.workdir}: this export's UNet takes prompts of one 75-token chunk; re-export it "
                             "with this sdtrt for longer prompts, or shorten the prompt")
        if req.init_image is not None:
            img2img.check_scheduler(req.scheduler)
            img2img.start_index(req.steps, req.strength)
            if "vae_encoder" not in self.manifest["components"]:
                raise UsageError(f"{self.workdir}: img2img needs the vae_encoder graph; export it")
            # resized here, once: a queued request holds (H, W, 3) uint8 pixels, not the caller's large image
            req = replace(req, init_image=img2img.prepare_image(req.init_image, req.width, req.height))
        self.check_rows(req, req.batch)
        return req

    def check_rows(self, request: GenerateRequest, rows: int) -> None:
        """``ShapeError`` if the backend cannot run a pass of ``rows`` images with ``request``'s settings (an
        engine's profile); allocates nothing. ``request`` is validated."""
        cfg = request.guidance > 1.0
        for dims, _ in self._unet_passes(rows, request.height, request.width, self._row_chunks([replace(request, batch=rows)], cfg)):
            self._unet.check(dims)
        self._decoder.check(self._decoder_dims(rows, request.height, request.width))

    def max_rows(self, request: GenerateRequest, limit: int) -> int:
        """The most images (at most ``limit``, at least ``request.batch``) one pass with ``request``'s settings may
        hold on this backend: what a micro-batch of it may grow to."""
        for rows in range(min(limit, MAX_BATCH), request.batch, -1):
            try:
                self.check_rows(request, rows)
                return rows
            except ShapeError:
                continue
        return request.batch

    def _decoder_dims(self, b: int, h: int, w: int) -> dict[str, int]:
        s = int(self.model["vae_scale_factor"])
        return {"B": b, "H": h // s, "W": w // s, f"{s}H": h, f"{s}W": w}

    def _row_chunks(self, reqs: Sequence[GenerateRequest], cfg: bool) -> tuple[int, ...]:
        """The prompt chunks of each UNet row: [negative prompts; prompts] under guidance, else the prompts."""
        counts = [(self.family.chunk_counts(r), r.batch) for r in reqs]
        uncond = [neg for (neg, _), n in counts for _ in range(n)]
        cond = [pos for (_, pos), n in counts for _ in range(n)]
        return tuple(uncond + cond) if cfg else tuple(cond)

    def _unet_passes(self, b: int, h: int, w: int, chunks: tuple[int, ...]) -> list[tuple[dict[str, int], tuple[int, ...] | None]]:
        """The UNet calls of one evaluation: (dims, rows) per distinct text length of the rows; rows None: one call
        for all rows, in order (every row the same length: the common case)."""
        s = int(self.model["vae_scale_factor"])
        by_length: dict[int, list[int]] = {}
        for row, k in enumerate(chunks):
            by_length.setdefault(k, []).append(row)
        dims = {"H": h // s, "W": w // s}
        if len(by_length) == 1:
            return [({"2B": len(chunks), **dims, "77T": CHUNK * chunks[0]}, None)]
        return [({"2B": len(rows), **dims, "77T": CHUNK * k}, tuple(rows)) for k, rows in sorted(by_length.items())]

    def generate(self, request: GenerateRequest) -> Result:
        result = self.generate_batch([request])[0]
        if isinstance(result, SdtrtError):
            raise result
        return result

    def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[Result | NonFiniteError]:
        """Several requests in one pass (micro-batching): their rows are stacked along the batch axis and run as one
        batch. Each request keeps its own prompt, negative prompt, seed and batch size, and its latents and step
        noise come from its own generator, so it gets the images it would get alone (up to float rounding of the
        larger batch). The requests must share a ``batch_key``. Per request: its ``Result``, or the
        ``NonFiniteError`` of a request whose own rows overflowed (the others are unaffected)."""
        if not requests:
            return []
        reqs = [self.validate(r) for r in requests]
        keys = {batch_key(r) for r in reqs}
        if len(keys) > 1:
            raise UsageError("requests batched together must share size, scheduler, steps, guidance, clip skip, "
                             "img2img strength and LoRAs")
        rows = sum(r.batch for r in reqs)
        if rows > MAX_BATCH:
            raise UsageError(f"a batch of {rows} images is over the limit of {MAX_BATCH}")
        with self._stream_context():
            return self._generate(reqs)

    def _stream_context(self):
        # On CUDA everything runs on the pipeline's own stream: TensorRT and graph capture dislike the legacy
        # default stream, which synchronises with every other stream.
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _generate(self, reqs: list[GenerateRequest]) -> list[Result | NonFiniteError]:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        s = int(self.model["vae_scale_factor"])
        first = reqs[0]  # the shared settings (one batch_key)
        b, cfg = sum(r.batch for r in reqs), first.guidance > 1.0
        ends = list(itertools.accumulate(r.batch for r in reqs))
        parts = [(req, slice(end - req.batch, end)) for req, end in zip(reqs, ends, strict=True)]  # rows per request
        h, w = first.height, first.width
        # 0. shapes first: a backend that cannot run them (an engine's profile) refuses before any work
        start = 0 if first.init_image is None else img2img.start_index(first.steps, first.strength)
        key = LoopKey(b, h, w, first.scheduler, first.steps, cfg, start, self._row_chunks(reqs, cfg))
        st = self._loop_state(key)  # activates (allocates) the UNet's buffers of every pass
        self._decoder.activate(self._decoder_dims(b, h, w))
        self._use_loras(first.loras)  # one LoRA set per pass (batch_key)

        # 1. conditioning into the UNet's static inputs, one row per image: [uncond; cond] under guidance, else cond
        rows: list[Mapping[str, torch.Tensor]] = []
        for negative in ((True, False) if cfg else (False,)):
            for req, _ in parts:
                rows += [self.family.condition(req, negative, self._lora_key)] * req.batch
        for p in st.passes:
            picked = [rows[i] for i in p.row_list]
            for name in self.family.cond_inputs:  # (n, ...) each
                p.inputs[name].copy_(torch.cat([row[name] for row in picked]))
        sync()
        t1 = time.perf_counter()
        timings["text_encoder"] = t1 - t0

        # 2. each request's latents and noise drawn from its own generator, as diffusers draws them
        for req, r in parts:
            generator = torch.Generator("cpu").manual_seed(req.seed)
            shape = (req.batch, int(self.model["latent_channels"]), h // s, w // s)
            if req.init_image is None:
                st.x[r].copy_(torch.randn(shape, generator=generator, dtype=torch.float32) * st.tables.init_noise_sigma)
            else:
                st.x[r].copy_(self._noised_image(req, st, start, shape, generator))
            for i in range(start, st.noise.shape[0]):  # one draw per evaluation that runs, in order
                st.noise[i, r].copy_(torch.randn(shape, generator=generator, dtype=torch.float32))
        if st.history is not None:
            st.history.zero_()
        st.guidance.fill_(first.guidance)

        # 3. the denoising loop
        if st.graph is not None:
            st.graph.replay()
        else:
            self._run_loop(st)
            if self.use_cuda_graph and not st.capture_failed:
                st.graph = self._capture(st)
        sync()
        t2 = time.perf_counter()
        timings["denoise"] = t2 - t1

        # 4. decode: (B, 4, h, w) -> (B, H, W, 3) uint8 and finite (B,)
        self._decoder.inputs["latent"].copy_(st.x)
        self._decoder.run()

        # 5. NaN/inf checks per image (one transfer), then the pixels
        finite = torch.stack([torch.isfinite(st.x).flatten(1).all(1), self._decoder.outputs["finite"]]).cpu()  # (2, B)
        pixels = self._decoder.outputs["image"].cpu().numpy()
        t3 = time.perf_counter()
        timings["vae_decoder"] = t3 - t2
        timings["total"] = t3 - t0

        from PIL import Image

        results: list[Result | NonFiniteError] = []
        for req, r in parts:
            if not finite[0, r].all():
                results.append(NonFiniteError("the denoising loop produced NaN/inf latents (UNet overflow); "
                                              "re-export with --precision fp32 or lower the guidance"))
            elif not finite[1, r].all():
                results.append(NonFiniteError("the VAE decoder produced NaN/inf pixels (fp16 overflow); "
                                              "re-export with --vae-precision fp32"))
            else:
                results.append(Result(
                    images=[Image.fromarray(np.ascontiguousarray(p)) for p in pixels[r]],
                    timings=dict(timings),
                    request=req,
                    backend=self.backend.name,
                    infotexts=[self.infotext(req, pos) for pos in range(req.batch)],
                    batch_rows=b,
                ))
        return results

    def infotext(self, req: GenerateRequest, batch_pos: int = 0) -> str:
        """A1111's ``parameters`` text, so other Stable Diffusion tools read the settings back."""
        hashes = ", ".join(f"{f.name}: {f.short_hash}" for f in self.loras.files(req.loras)) if req.loras else None
        return infotext.build_infotext(req, self.model_facts, batch_pos=batch_pos, lora_hashes=hashes)

    # -- stages -------------------------------------------------------------------------------------------------
    def _use_loras(self, loras: tuple) -> None:
        """Give the backend's weights the LoRA set ``loras`` (validated), or the base model's for ``()``."""
        key = self.loras.key(loras)
        if key == self._lora_key:
            return
        self._lora_key = None  # until the backend has finished: after a failed switch the next call re-applies
        self.backend.apply_lora(self.loras.deltas(loras) if loras else BASE)
        self._lora_key = key
        for st in self._loops.values():
            # TensorRT promises nothing about a refitted engine's weight addresses: re-capture on the next run
            st.graph = None

    def _noised_image(self, req: GenerateRequest, st: _LoopState, start: int, shape: tuple[int, ...],
                      generator: torch.Generator) -> torch.Tensor:
        """img2img's first latents: the encoded image sampled from its latent distribution (one draw, shared by
        the batch), then noised to evaluation ``start`` (a second draw), in diffusers' order."""
        if self._encoder is None:
            self._encoder = self.backend.runner("vae_encoder")
        s = int(self.model["vae_scale_factor"])
        pixels = req.init_image  # (H, W, 3) uint8: resized by validate
        self._encoder.activate({"B": 1, "H": req.height // s, "W": req.width // s, f"{s}H": req.height, f"{s}W": req.width})
        self._encoder.inputs["image"].copy_(torch.tensor(pixels)[None])
        self._encoder.run()
        mean = self._encoder.outputs["latent_mean"].float().cpu()  # (1, 4, h, w), times the scaling factor
        std = self._encoder.outputs["latent_std"].float().cpu()
        x0 = (mean + std * torch.randn(mean.shape, generator=generator, dtype=torch.float32)).expand(shape)
        a, sigma = img2img.noise_coefs(req.scheduler, self.scheduler_config, st.tables, start)
        return a * x0 + sigma * torch.randn(shape, generator=generator, dtype=torch.float32)

    def _loop_state(self, key: LoopKey) -> _LoopState:
        st = self._loops.get(key)
        if st is not None:
            self._loops.move_to_end(key)
            return st
        sched = schedulers.get_scheduler(key.scheduler)
        tables = sched.make_tables(self.scheduler_config, key.steps, key.start).to(self.device, torch.float32)
        s = int(self.model["vae_scale_factor"])
        shape = (key.batch, int(self.model["latent_channels"]), key.height // s, key.width // s)
        x = torch.zeros(shape, dtype=torch.float32, device=self.device)
        noise = torch.zeros((tables.num_evals if tables.needs_noise else 0, *shape), dtype=torch.float32, device=self.device)
        history = schedulers.new_history(tables, x)
        passes = []
        for dims, row_list in self._unet_passes(key.batch, key.height, key.width, key.chunks):
            self._unet.activate(dims)  # raises ShapeError outside an engine's profile, before any allocation
            rows = src = None
            if row_list is not None:
                rows = torch.tensor(row_list, dtype=torch.long, device=self.device)
                src = rows % key.batch
            passes.append(_UNetPass(dims, self._unet.inputs, self._unet.outputs, rows, src,
                                    row_list or tuple(range(len(key.chunks)))))
        out = None
        if len(passes) > 1:
            out = torch.zeros((len(key.chunks), *shape[1:]), dtype=torch.float32, device=self.device)
        st = _LoopState(key, tables, x, noise, history, torch.zeros((), dtype=torch.float32, device=self.device),
                        passes, out)
        self._loops[key] = st
        while len(self._loops) > LOOP_CACHE_SIZE:  # a server sees many shapes: keep memory bounded
            self._evict(self._loops.popitem(last=False)[0])
        return st

    def _evict(self, key: LoopKey) -> None:
        """Free an evicted loop's runner buffers unless a kept loop shares their shape (its graph reads them)."""
        def unet_dims(k: LoopKey) -> list[dict[str, int]]:
            return [dims for dims, _ in self._unet_passes(k.batch, k.height, k.width, k.chunks)]

        kept_unet = [d for k in self._loops for d in unet_dims(k)]
        for dims in unet_dims(key):
            if dims not in kept_unet:
                self._unet.release(dims)
        decoder = self._decoder_dims(key.batch, key.height, key.width)
        if all(self._decoder_dims(k.batch, k.height, k.width) != decoder for k in self._loops):
            self._decoder.release(decoder)
        log.debug("freed the loop state of %s", key)

    def _run_loop(self, st: _LoopState) -> None:
        """All evaluations of one request over static buffers. Python decisions here depend only on the key."""
        sched = schedulers.get_scheduler(st.key.scheduler)
        tables, b, cfg = st.tables, st.key.batch, st.key.cfg
        # one UNet call per evaluation, or one per text length (rows gathered into st.out): decided by the key
        out = st.passes[0].outputs["latent"] if st.out is None else st.out  # (2B or B, 4, h, w)
        # (E, B, 4, h, w) step noise, or nothing for deterministic schedulers: decided by the key, not per step
        noises = list(st.noise) if st.noise.shape[0] else [None] * tables.num_evals
        for i in range(st.key.start, tables.num_evals):
            x_in = st.x * at(tables.c_in, i)
            for p in st.passes:
                # (a) CFG batch: both halves see the same scaled latents
                sample = p.inputs["sample"]  # (n, 4, h, w)
                if p.rows is None:
                    sample[:b].copy_(x_in)
                    if cfg:
                        sample[b:].copy_(x_in)
                else:
                    sample.copy_(x_in.index_select(0, p.src))
                p.inputs["timestep"].copy_(at(tables.timesteps, i))  # (1,) float32
                # (b) UNet
                self._unet.activate(p.dims)  # a no-op with one pass; binds this pass's buffers otherwise
                self._unet.run()
                if p.rows is not None:
                    st.out.index_copy_(0, p.rows, p.outputs["latent"].float())
            # (c) guidance: uncond + g * (cond - uncond), in float32
            if cfg:
                uncond = out[:b].float()
                eps = uncond + st.guidance * (out[b:].float() - uncond)
            else:
                eps = out.float()
            # (d) scheduler step
            st.x.copy_(sched.step(tables, i, st.x, eps, st.history, noises[i]))

    def _capture(self, st: _LoopState) -> LoopGraph | None:
        """The loop of ``st`` captured into a CUDA graph, or None: a capture that fails (out of memory, an engine
        whose enqueue cannot be captured, kernels that refuse capture) leaves this key eager for good, as trtexec
        falls back; the request itself already ran eagerly and keeps its result, and other keys still capture."""
        buffers = [st.x, st.noise, st.guidance]
        for p in st.passes:
            buffers += [*p.inputs.values(), *p.outputs.values()]
        buffers += [t for t in (st.history, st.out) if t is not None]
        try:
            return LoopGraph(st.key, lambda: self._run_loop(st), buffers)
        except torch.cuda.OutOfMemoryError:
            log.warning("out of GPU memory capturing the loop for %s; running it eagerly", st.key)
        except (SdtrtError, RuntimeError) as e:
            log.warning("CUDA graph capture failed for %s (%s); running that loop eagerly", st.key, e)
        st.capture_failed = True
        return None
