"""The ``sdtrt`` command line: flags map to frozen config dataclasses here and nowhere else.

Start-up stays light: torch, diffusers, transformers and onnx are imported by the command that needs them, not
here (``benchmarks/startup.py`` measures it).

Any ``SdtrtError`` (bad input, failed validation) becomes one line on stderr and exit code 2; ``--debug`` shows
the traceback instead. Anything else is a bug: one line saying so, exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from sdtrt.errors import SdtrtError, UsageError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors take the same one-line path as every other."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# Choices of --backend, spelled here so that building the parser imports no torch; a test checks that they are
# sdtrt.runtime.backends.BACKENDS.
BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "onnxruntime", "torch")
# Choices of --prompt-syntax, likewise: a test checks that they are sdtrt.runtime.prompts.SYNTAXES.
PROMPT_SYNTAXES: tuple[str, ...] = ("a1111", "plain")


def _common(p: argparse.ArgumentParser, *, sub: bool = True) -> None:
    # A subcommand's flags default to "not given" (SUPPRESS) so that `sdtrt -q CMD` keeps the global -q.
    default = argparse.SUPPRESS if sub else False
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks and library logs")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bars or summaries (for scripts)")


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="DIR",
                   help="diffusers-format folder whose component configs describe a single-file checkpoint")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="CLIP tokenizer folder, for a single-file checkpoint without tokenizer/ beside it")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .ckpt/.pt pickles (with torch.load(weights_only=True)); refused by default")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the checkpoint's prediction type (e.g. epsilon for a single-file SD 2.x *base* model, "
                        "whose tensors look exactly like the 768-v model's)")
    p.add_argument("--vae", type=Path, metavar="PATH",
                   help="another VAE: a .safetensors file (original or diffusers layout) or a diffusers VAE folder; "
                        "also what a checkpoint without VAE weights needs")
    p.add_argument("--ema", action="store_true",
                   help="use the EMA weights of a file that has them (default: the regular ones)")


def build_parser() -> argparse.ArgumentParser:
    from sdtrt.checkpoint.archs import KNOWN_ARCHS
    from sdtrt.export.spec import COMPONENTS, DEFAULT_OPSET, PRECISIONS

    parser = _Parser(prog="sdtrt", description="TensorRT-accelerated Stable Diffusion: export, build, generate.")
    _common(parser, sub=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("init-random", help="write a diffusers-format checkpoint with random weights")
    _common(p)
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--arch", required=True, choices=KNOWN_ARCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--single-file", type=Path, metavar="PATH",
                   help="also write the weights as one original-layout .safetensors file")

    p = sub.add_parser("init-demo", help="write the shipped demo checkpoint (a trained toy model) as a diffusers folder")
    _common(p)
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")

    p = sub.add_parser("export", help="checkpoint -> validated ONNX graphs in WORKDIR")
    _common(p)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="diffusers folder or single-file checkpoint")
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--vae-precision", choices=PRECISIONS, default=None,
                   help="precision of the VAE graphs (default: fp32 for SDXL, whose VAE overflows in fp16, else "
                        "--precision)")
    p.add_argument("--components", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(COMPONENTS)} (default: every one the model has)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check")
    _checkpoint_flags(p)

    p = sub.add_parser("build", help="WORKDIR's ONNX graphs -> TensorRT engines in WORKDIR/engines")
    _common(p)
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--static", dest="dynamic", action="store_false",
                   help="one shape (default; fastest, what CUDA graphs want)")
    g.add_argument("--dynamic", dest="dynamic", action="store_true",
                   help="batch 1..--max-batch, sides --min-side..--max-side px, tuned at --batch/--height/--width")
    p.set_defaults(dynamic=False)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--max-batch", type=int, default=None, help="--dynamic only (default 4)")
    p.add_argument("--min-side", type=int, default=None, help="--dynamic only, px (default 256; SDXL 512)")
    p.add_argument("--max-side", type=int, default=None, help="--dynamic only, px (default 1024; SDXL 1536)")
    p.add_argument("--max-chunks", type=int, default=3, metavar="N",
                   help="longest prompt the UNet engine takes, in 75-token chunks, 1..8 (default 3)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    p.add_argument("--workspace", type=int, default=None, metavar="MiB", help="cap TensorRT's workspace memory pool")
    p.add_argument("--refit", action="store_true", help="build refittable engines")
    p.add_argument("--no-tf32", action="store_true", help="fp32 layers in strict fp32 instead of TF32")
    p.add_argument("--rebuild-stale", action="store_true",
                   help="rebuild only stale engines, each with its recorded settings")
    p.add_argument("--components", default=None, metavar="LIST", help="comma-separated (default: every exported one)")
    p.add_argument("--tensorrt", choices=("auto", "tensorrt", "rtx"), default="auto",
                   help="TensorRT (any NVIDIA GPU) or TensorRT-RTX (RTX GPUs; builds ahead of time without a GPU); "
                        "auto: TensorRT when installed, else TensorRT-RTX")
    p.add_argument("--target", default=None, metavar="LIST",
                   help="TensorRT-RTX only: compute capabilities to build for, comma-separated, of sm75, sm80, sm86, "
                        "sm89, sm120, sm121 (default: the visible GPU's)")

    p = sub.add_parser("check", help="compare each TensorRT engine with ONNX Runtime on random inputs")
    _common(p)
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", default=None, metavar="LIST")

    p = sub.add_parser("bench", help="sdtrt side by side with diffusers: latency, per-stage times, throughput, memory")
    _common(p)
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("--contenders", default="auto", metavar="LIST",
                   help="comma-separated (default: every contender that runs here): diffusers, diffusers-compile, "
                        "sdtrt-tensorrt, sdtrt-tensorrt-graph, sdtrt-onnxruntime, sdtrt-torch, sdtrt-torch-graph")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-sizes", default="1,2,4,8", metavar="LIST")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size; SDXL 1024)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size; SDXL 1024)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per contender and batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scheduler", default=None, help="default: the checkpoint's own")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every contender alike")
    p.add_argument("--skip-compile", action="store_true", help="leave out diffusers + torch.compile (compiles for minutes)")
    p.add_argument("--short", action="store_true", help="a CI-sized run (2 steps, 2 runs, batch 1,2, 64x64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="default: an astronaut riding a horse on mars")
    p.add_argument("--reference-device", choices=("auto", "cpu", "cuda", "none"), default="auto",
                   help="where the diffusers fp32 reference for PSNR runs (none: no image comparison)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR")
    p.add_argument("--stem", default=None, help="report file name stem (default: <device>-<date>)")

    p = sub.add_parser("generate", help="WORKDIR + prompt -> PNG(s)")
    _common(p)
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--negative-prompt", default="", metavar="TEXT")
    p.add_argument("--prompt-syntax", choices=PROMPT_SYNTAXES, default="a1111",
                   help="a1111 (default): A1111's emphasis (x) [x] (x:1.3), BREAK and 75-token chunks; plain: the "
                        "text as diffusers reads it, cut at 77 tokens")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 disables CFG)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help="sdtrt's name (dpmpp_2m_karras) or A1111's sampler (\"DPM++ 2M\"); default: the checkpoint's "
                        "own; see the README for the table")
    p.add_argument("--schedule-type", default=None, metavar="TYPE",
                   help="A1111's schedule type: Automatic (default; for an A1111 sampler what A1111 1.9+ runs, e.g. "
                        "DPM++ 2M -> Karras), Uniform, Karras, Exponential")
    p.add_argument("--eta", type=float, default=None, help="DDIM's eta in [0, 1] (default 0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="-1: a random seed, printed and written in the PNG")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--clip-skip", type=int, default=1, help="1: last CLIP layer, 2: penultimate (A1111 numbering)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--init-image", type=Path, default=None, metavar="IMAGE",
                   help="img2img: start from this image (default size: the image's, rounded down to multiples of 8)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img: how much of the schedule to run over the image, in (0, 1] (default 0.75)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA .safetensors (kohya or diffusers) at SCALE in [-4, 4] (default 1); repeatable")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"), metavar="PNG")

    p = sub.add_parser("serve", help="serve WORKDIR over HTTP: A1111 and OpenAI image APIs")
    _common(p)
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--max-batch", type=int, default=4, help="images per GPU pass (micro-batching)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 429 + Retry-After")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long an idle worker waits to fill a batch")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, queue included (then 504)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (then 413)")
    p.add_argument("--max-steps", type=int, default=150, help="steps per request (more: 422)")
    p.add_argument("--max-connections", type=int, default=256, help="open HTTP connections (more: 503)")
    p.add_argument("--api-key", default=os.environ.get("SDTRT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SDTRT_API_KEY; none: no auth)")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="LoRAs (.safetensors, by file name) for <lora:NAME:SCALE> in prompts and OpenAI's 'loras'")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (RAY_ADDRESS: join that cluster)")
    p.add_argument("--min-replicas", type=int, default=1, help="--ray: replicas kept up")
    p.add_argument("--max-replicas", type=int, default=None, help="--ray: autoscaling limit (default: one per GPU)")

    p = sub.add_parser("export-triton", help="write a Triton Inference Server model repository for WORKDIR")
    _common(p)
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("--model-name", default="sdtrt")
    p.add_argument("--max-batch", type=int, default=4, help="Triton's max_batch_size (dynamic batching)")
    p.add_argument("--queue-delay-us", type=int, default=10000, help="dynamic batching: max queue delay")
    p.add_argument("--instances-per-gpu", type=int, default=1)
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: all)")
    p.add_argument("--cpu", action="store_true", help="CPU instances (testing without a GPU)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="sdtrt backend inside Triton")
    p.add_argument("--execution-env", default=None, metavar="TAR_GZ",
                   help="conda-pack'd Python environment with sdtrt, for Triton's Python backend")
    p.add_argument("--python-path", default="", metavar="PATHS",
                   help=f"absolute directories ('{os.pathsep}'-separated) model.py puts in front of sys.path before "
                        "importing sdtrt: the site-packages of the environment sdtrt is installed in (Triton's Python "
                        "backend ignores PYTHONPATH)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model of that name in REPO")
    return parser


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # Never reach for a hub: every file sdtrt reads is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _quiet_libraries() -> None:
    """transformers and huggingface_hub draw their own loading bars; ours say more. Said through the environment:
    importing them here would cost every command seconds (diffusers has no such variable: ``_quiet_diffusers``)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Already imported (main() called in-process, as tests and embedders do): the variable was read, so say it.
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        sys.modules["diffusers"].utils.logging.disable_progress_bar()


def _quiet_diffusers(args: argparse.Namespace) -> None:
    """For commands that import diffusers anyway."""
    if not args.debug:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


def _cmd_init_random(args: argparse.Namespace) -> None:
    from sdtrt.checkpoint.random_init import init_random

    def progress(msg: str) -> None:
        print(f"init-random {args.arch}: {msg}", file=sys.stderr)

    _quiet_diffusers(args)
    path = init_random(args.dir, args.arch, seed=args.seed, overwrite=args.overwrite,
                       progress=None if args.quiet else progress)
    if args.single_file:
        from sdtrt.checkpoint.diffusers_dir import load_diffusers_dir
        from sdtrt.checkpoint.ldm_layout import save_single_file

        save_single_file(load_diffusers_dir(path), args.single_file)
    if not args.quiet:
        print(f"wrote {args.arch} checkpoint with random weights (seed {args.seed}) to {path}")
        if args.single_file:
            print(f"wrote single-file checkpoint {args.single_file}")


def _cmd_init_demo(args: argparse.Namespace) -> None:
    from sdtrt.demo import init_demo

    path = init_demo(args.dir, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote the demo checkpoint (draws 'a {{colour}} {{shape}} on a {{colour}} background', 32x32) to {path}")


def _cmd_export(args: argparse.Namespace) -> None:
    from sdtrt.checkpoint.loader import load_checkpoint
    from sdtrt.export.pipeline import export_checkpoint
    from sdtrt.export.spec import ExportSpec

    spec = ExportSpec(
        precision=args.precision,
        vae_precision=args.vae_precision,
        components=_components_arg(args.components),
        opset=args.opset,
        validate=not args.no_validate,
    )
    _quiet_diffusers(args)
    ckpt = load_checkpoint(args.checkpoint, config_dir=args.config, tokenizer_dir=args.tokenizer,
                           allow_pickle=args.allow_pickle, vae=args.vae, ema=args.ema)
    if args.prediction_type:
        ckpt = dataclasses.replace(ckpt, scheduler_config={**ckpt.scheduler_config, "prediction_type": args.prediction_type})
    load_options = {"config_dir": str(args.config.resolve()) if args.config else None, "allow_pickle": args.allow_pickle,
                    "vae": str(args.vae.resolve()) if args.vae else None, "ema": args.ema}
    manifest = export_checkpoint(ckpt, args.workdir, spec, progress=not args.quiet, load_options=load_options,
                                 release=True)  # loaded for this export only: free each module when done
    if args.quiet:
        return
    print(f"exported {ckpt.arch or ckpt.family} ({ckpt.format}) to {args.workdir}")
    for note in ckpt.notes:
        print(f"  {note}")
    for name in spec.resolved(ckpt.family).components:
        entry = manifest["components"][name]
        worst = ""
        if entry["validation"]:
            checks = [v for per_shape in entry["validation"] for v in per_shape.values()]
            floats = [v for v in checks if v["metric"] != "mismatches"]
            w = max(floats, key=lambda v: v["value"] / v["tolerance"])
            worst = f"  max error {w['value']:.2g} ({w['metric']}, tolerance {w['tolerance']:g})"
        print(f"  {name:<13} {entry['precision']}  {entry['files'][0]['path']}{worst}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from sdtrt.lora.deltas import parse_lora_arg
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.runtime.png import output_paths, save_result
    from sdtrt.runtime.request import RANDOM_SEED, GenerateRequest

    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength is img2img's denoising strength: give --init-image too")
    init_image = None
    if args.init_image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(args.init_image) as im:
                init_image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise UsageError(f"{args.init_image}: cannot read the init image ({e})") from None
    request = GenerateRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, prompt_syntax=args.prompt_syntax, steps=args.steps,
        guidance=args.guidance, scheduler=args.scheduler, schedule_type=args.schedule_type, eta=args.eta,
        seed=args.seed, batch=args.batch, height=args.height, width=args.width, clip_skip=args.clip_skip,
        init_image=init_image, strength=0.75 if args.strength is None else args.strength,
        loras=tuple(parse_lora_arg(a) for a in args.lora),
    )
    output_paths(args.output, args.batch)  # checked before any heavy work
    pipe = Pipeline.load(args.workdir, backend=args.backend)
    result = pipe.generate(request)
    paths = save_result(result, args.output)
    if args.seed == RANDOM_SEED:  # the seed drawn, even with -q: the one way to make the image again
        print(f"seed {result.request.seed}")
    if not args.quiet:
        for path in paths:
            print(f"wrote {path}")
        t = result.timings
        r = result.request
        print(f"{r.width}x{r.height}, {r.steps} steps of {r.scheduler}, seed {r.seed}, batch {r.batch}, "
              f"backend {pipe.backend.name} "
              f"({pipe.device}{', CUDA graph' if pipe.use_cuda_graph else ''}): "
              + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in t.items()))


def _components_arg(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(c.strip() for c in value.split(",") if c.strip())


def _cmd_build(args: argparse.Namespace) -> None:
    from sdtrt.engines.builder import build_engines
    from sdtrt.engines.profiles import BuildSpec, ProfileSpec

    spec = BuildSpec(
        profile=ProfileSpec(static=not args.dynamic, batch=args.batch, height=args.height, width=args.width,
                            max_batch=args.max_batch, min_side=args.min_side, max_side=args.max_side,
                            max_chunks=args.max_chunks),
        opt_level=args.opt_level, workspace_mib=args.workspace, refit=args.refit, tf32=not args.no_tf32,
        rebuild_stale=args.rebuild_stale, tensorrt=args.tensorrt, targets=_components_arg(args.target) or (),
    )
    built = build_engines(args.workdir, spec, components=_components_arg(args.components), progress=not args.quiet,
                          announce=None if args.quiet else print)
    if not args.quiet:
        for path in built:
            print(f"built {path}")
        if not built:
            print("engines are up to date")


def _cmd_check(args: argparse.Namespace) -> None:
    from sdtrt.engines.check import check_engines, format_report
    from sdtrt.errors import EngineError

    report = check_engines(args.workdir, seed=args.seed, components=_components_arg(args.components))
    print(format_report(report))
    if not report.passed:
        raise EngineError(f"{len(report.failures)} output(s) exceed their tolerance")


def _cmd_bench(args: argparse.Namespace) -> None:
    from sdtrt.bench.report import summary_lines, write_reports
    from sdtrt.bench.run import run_bench
    from sdtrt.bench.spec import SHORT, BenchSpec, parse_batch_sizes, parse_contenders

    fields = dict(
        contenders=parse_contenders(args.contenders), steps=args.steps, batch_sizes=parse_batch_sizes(args.batch_sizes),
        height=args.height, width=args.width, runs=args.runs, warmup=args.warmup, scheduler=args.scheduler,
        threads=args.threads, skip_compile=args.skip_compile, seed=args.seed, reference_device=args.reference_device,
    )
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    if args.short:
        fields.update(SHORT)
    _quiet_diffusers(args)
    result = run_bench(args.workdir, BenchSpec(**fields), progress=not args.quiet)
    paths = write_reports(result, args.out, stem=args.stem)
    if not args.quiet:
        for line in summary_lines(result):
            print(line)
        for path in paths:
            print(f"wrote {path}")


def _cmd_serve(args: argparse.Namespace) -> None:
    from sdtrt.serve.app import ServeSpec

    spec = ServeSpec(max_batch=args.max_batch, max_queue=args.max_queue, batch_window_ms=args.batch_window_ms,
                     timeout_s=args.timeout, api_key=args.api_key, max_body_mb=args.max_body_mb,
                     max_steps=args.max_steps, max_connections=args.max_connections,
                     lora_dir=args.lora_dir)  # checked before the model loads

    def announce(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.ray:
        from sdtrt.serve.ray_app import RaySpec, run_ray

        run_ray(args.workdir, spec, RaySpec(min_replicas=args.min_replicas, max_replicas=args.max_replicas),
                host=args.host, port=args.port, backend=args.backend, announce=announce)
    else:
        from sdtrt.serve.server import run_server

        run_server(args.workdir, spec, host=args.host, port=args.port, backend=args.backend, announce=announce,
                   debug=args.debug)


def _cmd_export_triton(args: argparse.Namespace) -> None:
    from sdtrt.serve.triton import TritonSpec, export_triton

    gpus = None
    if args.gpus is not None:
        try:
            gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
        except ValueError:
            raise UsageError(f"--gpus must be comma-separated integers, got {args.gpus!r}") from None
    spec = TritonSpec(model_name=args.model_name, max_batch_size=args.max_batch, max_queue_delay_us=args.queue_delay_us,
                      instances_per_gpu=args.instances_per_gpu, gpus=gpus, backend=args.backend, cpu=args.cpu,
                      execution_env=args.execution_env,
                      python_path=tuple(args.python_path.split(os.pathsep)) if args.python_path else ())
    model_dir = export_triton(args.workdir, args.repo, spec, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {model_dir}; start it with: tritonserver --model-repository {args.repo}")


COMMANDS = {
    "serve": _cmd_serve,
    "export-triton": _cmd_export_triton,
    "bench": _cmd_bench,
    "init-random": _cmd_init_random,
    "init-demo": _cmd_init_demo,
    "export": _cmd_export,
    "build": _cmd_build,
    "check": _cmd_check,
    "generate": _cmd_generate,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _configure_logging(debug)
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("no command given (see `sdtrt --help`)")
        if not debug:
            _quiet_libraries()
        COMMANDS[args.command](args)
        return 0
    except SdtrtError as e:
        if debug:
            raise
        print(f"sdtrt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sdtrt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        print(f"sdtrt: internal error: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
