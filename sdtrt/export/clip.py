"""CLIP text encoder export (SD 1.x: OpenAI CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H/14 converted to CLIPTextModel)."""

from __future__ import annotations

import torch

from sdtrt.checkpoint.model import Checkpoint
from sdtrt.export.component import ComponentExport, TensorSpec, graph_io

MAX_LENGTH = 77


class TextEncoderGraph(torch.nn.Module):
    """input_ids (B, 77) int32 -> last_hidden_state (B, 77, C) and penultimate_hidden_state (B, 77, C).

    ``penultimate_hidden_state`` is the second-to-last layer's output passed through the final LayerNorm, exactly
    what diffusers feeds the UNet for ``clip_skip=1`` (A1111's "CLIP skip 2").
    """

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        # transformers 5 flattened CLIPTextModel; 4.x wraps the same modules in ``.text_model``.
        self.text_model = getattr(text_encoder, "text_model", text_encoder)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_model(input_ids=input_ids.to(torch.int64), output_hidden_states=True)
        penultimate = self.text_model.final_layer_norm(out.hidden_states[-2])
        return out.last_hidden_state, penultimate


def text_encoder_export(ckpt: Checkpoint) -> ComponentExport:
    cfg = ckpt.text_encoder.config
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    inputs = (TensorSpec("input_ids", ("B", MAX_LENGTH), "int32"),)
    outputs = (
        TensorSpec("last_hidden_state", ("B", MAX_LENGTH, hidden), "float"),
        TensorSpec("penultimate_hidden_state", ("B", MAX_LENGTH, hidden), "float"),
    )

    def make_inputs(batch: int, height: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab, (batch, MAX_LENGTH), generator=gen, dtype=torch.int64)
        ids[:, 0] = cfg.bos_token_id
        return (ids.to(torch.int32),)

    return ComponentExport(
        name="text_encoder",
        module=TextEncoderGraph(ckpt.text_encoder).eval(),
        io=graph_io(inputs, outputs),
        inputs=inputs,
        outputs=outputs,
        make_inputs=make_inputs,
        check_sizes=((2, 0, 0), (1, 0, 0)),
    )
