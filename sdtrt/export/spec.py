"""What an export should produce, as one frozen config, and what each model family exports (data, not branches)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from sdtrt.errors import ExportError, UsageError

#: ONNX opset 17: the lowest with a native LayerNormalization op (so LayerNorm stays one node, which TensorRT
#: fuses and which the fp16 pass can keep in fp32 as one island), parsed by TensorRT 8.6 to 11 and ONNX Runtime.
#: Opset 18 only changes Reduce*/Resize attributes into inputs, which buys nothing here.
DEFAULT_OPSET = 17

#: Every component any family exports, in build and report order.
COMPONENTS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
PRECISIONS: tuple[str, ...] = ("fp16", "fp32")


@dataclass(frozen=True)
class FamilySpec:
    """What one model family exports. ``text_encoders``: (component, graph kind) in the order the UNet's
    ``encoder_hidden_states`` concatenates their hidden states along channels; ``unet``: the UNet graph kind
    (``sdtrt.export.modules`` maps kinds to wrapper modules); ``vae_precision``: the VAE graphs' precision when
    ``--vae-precision`` is not given (None: ``--precision``)."""

    text_encoders: tuple[tuple[str, str], ...]
    unet: str
    vae_precision: str | None = None

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        return (*self.text_encoder_names, "unet", "vae_decoder", "vae_encoder")


FAMILIES: dict[str, FamilySpec] = {
    "sd1": FamilySpec((("text_encoder", "clip"),), "sd"),
    "sd2": FamilySpec((("text_encoder", "clip"),), "sd"),
    # SDXL's VAE overflows in fp16 (diffusers upcasts it, or ships a fixed fp16 VAE): fp32 unless asked otherwise
    "sdxl": FamilySpec((("text_encoder", "penultimate"), ("text_encoder_2", "pooled_penultimate")), "sdxl", "fp32"),
    "sdxl-refiner": FamilySpec((("text_encoder_2", "pooled_penultimate"),), "sdxl", "fp32"),
}


def family_spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ExportError(f"this sdtrt cannot export the model family {family!r}; known: {', '.join(FAMILIES)}") from None


@dataclass(frozen=True)
class ExportSpec:
    """``precision`` applies to the text encoders and UNet; ``vae_precision`` to both VAE graphs (default: the
    family's, else ``precision``). ``components`` None: every component of the checkpoint's family."""

    precision: str = "fp16"
    vae_precision: str | None = None
    components: tuple[str, ...] | None = None
    opset: int = DEFAULT_OPSET
    validate: bool = True

    def __post_init__(self) -> None:
        for p in (self.precision, self.vae_precision):
            if p is not None and p not in PRECISIONS:
                raise UsageError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")
        if self.components is not None:
            unknown = [c for c in self.components if c not in COMPONENTS]
            if unknown or not self.components:
                raise UsageError(f"unknown component(s) {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(COMPONENTS)}")
        if self.opset < 17:
            raise UsageError(f"opset {self.opset} is too old: sdtrt needs opset >= 17 (native LayerNormalization)")

    def resolved(self, family: str) -> ExportSpec:
        """This spec for a checkpoint of ``family``: its components (checked against the family's) and its VAE
        precision filled in."""
        fam = family_spec(family)
        wanted = fam.components if self.components is None else self.components
        missing = [c for c in wanted if c not in fam.components]
        if missing:
            raise UsageError(f"a {family} checkpoint has no {', '.join(missing)}; its components are "
                             f"{', '.join(fam.components)}")
        vae = self.vae_precision or fam.vae_precision or self.precision
        return replace(self, components=tuple(c for c in fam.components if c in wanted), vae_precision=vae)

    def precision_of(self, component: str) -> str:
        if component.startswith("vae_"):
            return self.vae_precision or self.precision
        return self.precision
