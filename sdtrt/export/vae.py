"""VAE export: the decoder (latent -> finished uint8 pixels) and the encoder (uint8 pixels -> latent distribution).

Pixel conversion lives inside the graphs so the runtime copies finished pixels and never runs its own
elementwise kernels on images: the decoder folds in 1/scaling_factor, [-1, 1] -> [0, 255], rounding, clamping and
the NCHW -> NHWC transpose; the encoder folds in the inverse and the scaling factor.

TensorRT's ONNX parsers accept UINT8 only on network inputs and outputs, so every transpose runs on floats: the
decoder ends ``Round -> Transpose -> Cast(UINT8) -> image`` and the encoder starts ``image -> Cast -> Transpose``
(``sdtrt.export.trt_rules`` refuses any other placement at export).
"""

from __future__ import annotations

import torch

from sdtrt.checkpoint.model import Checkpoint
from sdtrt.export.component import CheckSize, ComponentExport, TensorSpec, graph_io


class VaeDecoderGraph(torch.nn.Module):
    """latent (B, 4, H/8, W/8) scaled latents -> image (B, H, W, 3) uint8, as diffusers' postprocess makes it,
    and finite (B,) bool: whether the decoded image was free of NaN/inf before the uint8 cast hid it (the fp16
    black-image failure), so the runtime can report it instead of returning a black image."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
        finite = torch.isfinite(image).flatten(1).all(1)  # (B,)
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)  # (B, H, W, 3) float
        # Cast last: its output is the graph output, the only place TensorRT allows a UINT8 tensor.
        return image.to(torch.uint8), finite


class VaeEncoderGraph(torch.nn.Module):
    """image (B, H, W, 3) uint8 -> latent_mean, latent_std (B, 4, H/8, W/8), both times scaling_factor.

    img2img draws ``latent = latent_mean + latent_std * eps`` with the seeded generator, as diffusers samples
    the latent distribution, so both moments are outputs.
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cast first: its input is the graph input, the only place TensorRT allows a UINT8 tensor.
        x = image.float().permute(0, 3, 1, 2) / 255.0  # (B, 3, H, W)
        x = 2.0 * x - 1.0  # diffusers' VaeImageProcessor.normalize
        dist = self.vae.encode(x, return_dict=False)[0]
        return dist.mean * self.scaling_factor, dist.std * self.scaling_factor


def vae_scale_factor(ckpt: Checkpoint) -> int:
    return _scale(ckpt.vae)


def _scale(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_decoder_export(module: VaeDecoderGraph) -> ComponentExport:
    ch = module.vae.config.latent_channels
    s = _scale(module.vae)
    inputs = (TensorSpec("latent", ("B", ch, "H", "W"), "float"),)
    outputs = (TensorSpec("image", ("B", f"{s}H", f"{s}W", 3), "uint8"), TensorSpec("finite", ("B",), "bool"))

    def make_inputs(size: CheckSize, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(size.batch, ch, size.height // s, size.width // s, generator=gen),)

    return ComponentExport(
        name="vae_decoder",
        module=module.eval(),
        io=graph_io(inputs, outputs),
        inputs=inputs,
        outputs=outputs,
        make_inputs=make_inputs,
        check_sizes=(CheckSize(1, 8 * s, 8 * s), CheckSize(2, 6 * s, 10 * s)),
    )


def vae_encoder_export(module: VaeEncoderGraph) -> ComponentExport:
    ch = module.vae.config.latent_channels
    s = _scale(module.vae)
    inputs = (TensorSpec("image", ("B", f"{s}H", f"{s}W", 3), "uint8"),)
    outputs = (
        TensorSpec("latent_mean", ("B", ch, "H", "W"), "float"),
        TensorSpec("latent_std", ("B", ch, "H", "W"), "float"),
    )

    def make_inputs(size: CheckSize, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 256, (size.batch, size.height, size.width, 3), generator=gen, dtype=torch.uint8),)

    return ComponentExport(
        name="vae_encoder",
        module=module.eval(),
        io=graph_io(inputs, outputs),
        inputs=inputs,
        outputs=outputs,
        make_inputs=make_inputs,
        check_sizes=(CheckSize(1, 8 * s, 8 * s), CheckSize(2, 6 * s, 10 * s)),
    )
