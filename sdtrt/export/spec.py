"""What an export should produce, as one frozen config."""

from __future__ import annotations

from dataclasses import dataclass

from sdtrt.errors import UsageError

#: ONNX opset 17: the lowest with a native LayerNormalization op (so LayerNorm stays one node, which TensorRT
#: fuses and which the fp16 pass can keep in fp32 as one island), parsed by TensorRT 8.6 to 11 and ONNX Runtime.
#: Opset 18 only changes Reduce*/Resize attributes into inputs, which buys nothing here.
DEFAULT_OPSET = 17

COMPONENTS: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
PRECISIONS: tuple[str, ...] = ("fp16", "fp32")


@dataclass(frozen=True)
class ExportSpec:
    """``precision`` applies to the text encoder and UNet; ``vae_precision`` to both VAE graphs (default: same)."""

    precision: str = "fp16"
    vae_precision: str | None = None
    components: tuple[str, ...] = COMPONENTS
    opset: int = DEFAULT_OPSET
    validate: bool = True

    def __post_init__(self) -> None:
        for p in (self.precision, self.vae_precision):
            if p is not None and p not in PRECISIONS:
                raise UsageError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components:
            raise UsageError(f"unknown component(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(COMPONENTS)}")
        if self.opset < 17:
            raise UsageError(f"opset {self.opset} is too old: sdtrt needs opset >= 17 (native LayerNormalization)")

    def precision_of(self, component: str) -> str:
        if component.startswith("vae_"):
            return self.vae_precision or self.precision
        return self.precision
