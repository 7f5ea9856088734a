"""UNet export: one call predicts noise for the conditional and unconditional halves of a CFG batch.

The text axis is dynamic for every family: ``encoder_hidden_states`` is (2B, 77T, C), T >= 1 prompt chunks of 75
tokens laid side by side (A1111's long prompts). Cross-attention is the only consumer of that axis, and it reads
any key length, so one graph serves every chunk count an engine profile allows.
"""

from __future__ import annotations

import torch

from sdtrt.errors import ExportError
from sdtrt.export.clip import MAX_LENGTH
from sdtrt.export.component import CheckSize, ComponentExport, TensorSpec, graph_io

TEXT_AXIS = f"{MAX_LENGTH}T"  # 77 tokens per prompt chunk, T chunks


class UNetGraph(torch.nn.Module):
    """sample (2B, 4, H/8, W/8), timestep (1,) fp32, encoder_hidden_states (2B, 77T, C) -> latent (2B, 4, H/8, W/8).

    Classifier-free guidance is folded into the batch: the runtime stacks [uncond; cond] and gets both predictions
    from one call. ``timestep`` stays float32 even in fp16 graphs (see ``sdtrt.export.fp16``).
    """

    COND_INPUTS: tuple[str, ...] = ()
    FP32_INPUTS = ("timestep",)

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class SDXLUNetGraph(UNetGraph):
    """UNetGraph plus SDXL's micro-conditioning: text_embeds (2B, P) (the pooled text embedding) and time_ids
    (2B, 6) (original size, crop top-left, target size) or, for the refiner, (2B, 5) (the aesthetic score in place
    of the target size). ``time_ids`` is float32 in fp16 graphs too: its sinusoidal projection of sizes up to
    thousands of pixels has no useful digits left in fp16, as for ``timestep``."""

    COND_INPUTS = ("text_embeds", "time_ids")
    FP32_INPUTS = ("timestep", "time_ids")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


def upsample_factor(unet: torch.nn.Module) -> int:
    """How many times the UNet halves the latent: latent sides that are not a multiple of it need explicit
    upsample sizes (diffusers' ``forward_upsample_size`` path)."""
    return 2 ** sum(1 for b in unet.up_blocks if getattr(b, "upsamplers", None))


def time_ids_count(unet: torch.nn.Module, pooled_dim: int) -> int:
    """How many time ids an SDXL-style (``text_time``) UNet takes: its additional embedding reads the pooled text
    embedding (``pooled_dim``) and each time id's sinusoidal projection (``addition_time_embed_dim`` wide)."""
    cfg = unet.config
    ids, rest = divmod(int(cfg.projection_class_embeddings_input_dim) - pooled_dim, int(cfg.addition_time_embed_dim))
    if rest or ids < 1:
        raise ExportError(f"the UNet's additional embedding takes {cfg.projection_class_embeddings_input_dim} values, "
                          f"which is not the pooled text embedding ({pooled_dim}) plus whole time ids of "
                          f"{cfg.addition_time_embed_dim}: text_encoder_2 does not belong to this UNet")
    return ids


def unet_export(module: UNetGraph, vae_scale: int, pooled_dim: int | None = None) -> ComponentExport:
    """The export of ``module``; ``pooled_dim`` (the pooled text embedding's width) for SDXL's UNet."""
    unet = module.unet
    cfg = unet.config
    ctx, ch = cfg.cross_attention_dim, cfg.in_channels
    cond_shapes = {}
    if module.COND_INPUTS:
        cond_shapes = {"text_embeds": ("2B", pooled_dim), "time_ids": ("2B", time_ids_count(unet, pooled_dim))}
    cond = tuple(TensorSpec(n, cond_shapes[n], "float32" if n in module.FP32_INPUTS else "float")
                 for n in module.COND_INPUTS)
    inputs = (
        TensorSpec("sample", ("2B", ch, "H", "W"), "float"),
        TensorSpec("timestep", (1,), "float32"),
        TensorSpec("encoder_hidden_states", ("2B", TEXT_AXIS, ctx), "float"),
        *cond,
    )
    outputs = (TensorSpec("latent", ("2B", cfg.out_channels, "H", "W"), "float"),)

    def make_inputs(size: CheckSize, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        rows = 2 * size.batch
        sample = torch.randn(rows, ch, size.height // vae_scale, size.width // vae_scale, generator=gen)
        timestep = torch.randint(1, 1000, (1,), generator=gen).float()
        hidden = torch.randn(rows, MAX_LENGTH * size.chunks, ctx, generator=gen)
        extra = []
        for spec in cond:
            if spec.name == "time_ids":  # sizes in px (and the refiner's aesthetic score): large, like timesteps
                extra.append(torch.randint(0, 2048, (rows, spec.shape[1]), generator=gen).float())
            else:
                extra.append(torch.randn(rows, spec.shape[1], generator=gen))
        return sample, timestep, hidden, *extra

    # Trace on a latent side that is NOT a multiple of the upsample factor: diffusers then passes explicit
    # upsample sizes taken from the skip connections, so the graph works for every multiple of 8 px, not only
    # for multiples of 8 * factor. Trace at one prompt chunk and check a second shape at three, to prove the
    # dynamic axes (batch, sides and text).
    f = upsample_factor(unet)
    side = vae_scale * (f + 1)
    return ComponentExport(
        name="unet",
        module=module.eval(),
        io=graph_io(inputs, outputs, fp32_inputs=module.FP32_INPUTS),
        inputs=inputs,
        outputs=outputs,
        make_inputs=make_inputs,
        check_sizes=(CheckSize(1, side, side, 1), CheckSize(2, vae_scale * 2 * f, vae_scale * (3 * f + 1), 3)),
    )
