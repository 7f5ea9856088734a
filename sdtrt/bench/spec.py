"""What a benchmark run measures, as one frozen config, and the contenders it may name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sdtrt.errors import UsageError

#: Every contender ``--contenders`` may name. ``diffusers`` is the PyTorch baseline (fp16 + SDPA on CUDA, fp32 on
#: CPU); ``-compile`` adds ``torch.compile`` of its UNet and VAE decoder; ``sdtrt-<backend>`` runs the loop eagerly,
#: ``sdtrt-<backend>-graph`` replays it as one CUDA graph (CUDA only).
CONTENDERS: tuple[str, ...] = (
    "diffusers",
    "diffusers-compile",
    "sdtrt-tensorrt",
    "sdtrt-tensorrt-graph",
    "sdtrt-onnxruntime",
    "sdtrt-torch",
    "sdtrt-torch-graph",
)
BASELINE = "diffusers"
#: ``--short``: a CI-friendly run on a tiny checkpoint (seconds on two CPU cores); checks the harness, not speeds.
SHORT = {"steps": 2, "runs": 2, "warmup": 1, "batch_sizes": (1, 2), "height": 64, "width": 64}
REFERENCE_DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "none")


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run. ``contenders`` empty: every contender that runs on this machine (``diffusers-compile``
    only on CUDA and without ``skip_compile``). ``threads``: torch and ONNX Runtime intra-op threads for every
    contender alike (None: each library's default). ``reference_device``: where the diffusers fp32 reference
    for PSNR runs (``auto``: the benchmark's device, with TF32 off; ``none``: no image comparison)."""

    contenders: tuple[str, ...] = ()
    steps: int = 50
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    height: int | None = None  # None: the model's native size (the manifest's default_size: 512, 768, 1024)
    width: int | None = None
    runs: int = 10
    warmup: int = 2
    prompt: str = "a photo of an astronaut riding a horse on mars"
    negative_prompt: str = ""
    guidance: float = 7.5
    seed: int = 0
    scheduler: str | None = None  # None: the checkpoint's own, for every contender
    threads: int | None = None
    skip_compile: bool = False
    compile_mode: str = "reduce-overhead"
    reference_device: str = "auto"

    def __post_init__(self) -> None:
        unknown = [c for c in self.contenders if c not in CONTENDERS]
        if unknown:
            raise UsageError(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
        if len(set(self.contenders)) != len(self.contenders):
            raise UsageError("a contender is named twice")
        for name, v, lo in (("steps", self.steps, 1), ("runs", self.runs, 1), ("warmup", self.warmup, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be positive integers, got {self.batch_sizes!r}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise UsageError(f"a batch size is given twice: {self.batch_sizes!r}")
        for name, v in (("height", self.height), ("width", self.width)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 8 or v % 8):
                raise UsageError(f"{name} must be a multiple of 8, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UsageError(f"threads must be a positive integer, got {self.threads!r}")
        if self.reference_device not in REFERENCE_DEVICES:
            raise UsageError(f"reference device must be one of {', '.join(REFERENCE_DEVICES)}, got {self.reference_device!r}")

    def at_native_size(self, default_size: int) -> BenchSpec:
        """This spec with an unset height or width taken from the model's native size."""
        return dataclasses.replace(self, height=self.height or int(default_size), width=self.width or int(default_size))

    @property
    def smallest_batch(self) -> int:
        return min(self.batch_sizes)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)``, for the CLI."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    return sizes


def parse_contenders(text: str) -> tuple[str, ...]:
    """``"diffusers,sdtrt-onnxruntime"`` -> a tuple; ``""`` or ``"auto"``: every contender available."""
    if text.strip() in ("", "auto"):
        return ()
    return tuple(s.strip() for s in text.split(",") if s.strip())
