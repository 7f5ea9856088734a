"""UNet export: one call predicts noise for the conditional and unconditional halves of a CFG batch."""

from __future__ import annotations

import torch

from sdtrt.checkpoint.model import Checkpoint
from sdtrt.export.clip import MAX_LENGTH
from sdtrt.export.component import ComponentExport, TensorSpec, graph_io


class UNetGraph(torch.nn.Module):
    """sample (2B, 4, H/8, W/8), timestep (1,) fp32, encoder_hidden_states (2B, 77, C) -> latent (2B, 4, H/8, W/8).

    Classifier-free guidance is folded into the batch: the runtime stacks [uncond; cond] and gets both predictions
    from one call. ``timestep`` stays float32 even in fp16 graphs (see ``sdtrt.export.fp16``).
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def upsample_factor(unet: torch.nn.Module) -> int:
    """How many times the UNet halves the latent: latent sides that are not a multiple of it need explicit
    upsample sizes (diffusers' ``forward_upsample_size`` path)."""
    return 2 ** sum(1 for b in unet.up_blocks if getattr(b, "upsamplers", None))


def unet_export(ckpt: Checkpoint, vae_scale: int) -> ComponentExport:
    cfg = ckpt.unet.config
    ctx, ch = cfg.cross_attention_dim, cfg.in_channels
    inputs = (
        TensorSpec("sample", ("2B", ch, "H", "W"), "float"),
        TensorSpec("timestep", (1,), "float32"),
        TensorSpec("encoder_hidden_states", ("2B", MAX_LENGTH, ctx), "float"),
    )
    outputs = (TensorSpec("latent", ("2B", cfg.out_channels, "H", "W"), "float"),)

    def make_inputs(batch: int, height: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        sample = torch.randn(2 * batch, ch, height // vae_scale, width // vae_scale, generator=gen)
        timestep = torch.randint(1, 1000, (1,), generator=gen).float()
        hidden = torch.randn(2 * batch, MAX_LENGTH, ctx, generator=gen)
        return sample, timestep, hidden

    # Trace on a latent side that is NOT a multiple of the upsample factor: diffusers then passes explicit
    # upsample sizes taken from the skip connections, so the graph works for every multiple of 8 px, not only
    # for multiples of 8 * factor. Check on a second, different shape to prove the dynamic axes.
    f = upsample_factor(ckpt.unet)
    side = vae_scale * (f + 1)
    return ComponentExport(
        name="unet",
        module=UNetGraph(ckpt.unet).eval(),
        io=graph_io(inputs, outputs, fp32_inputs=("timestep",)),
        inputs=inputs,
        outputs=outputs,
        make_inputs=make_inputs,
        check_sizes=((1, side, side), (2, vae_scale * 2 * f, vae_scale * (3 * f + 1))),
    )
