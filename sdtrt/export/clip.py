"""CLIP text encoder export: SD 1.x (OpenAI CLIP ViT-L/14), SD 2.x (OpenCLIP ViT-H/14 converted to CLIPTextModel)
and SDXL's two (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its text projection).

Every graph takes ``input_ids`` (B, 77) int32: one 75-token prompt chunk per row (the runtime lays chunks side by
side itself). The outputs are what each family feeds its UNet:

* ``TextEncoderGraph`` (SD): ``last_hidden_state`` and ``penultimate_hidden_state``, both through the final LayerNorm
  (``clip_skip`` 1 and 2).
* ``PenultimateGraph`` (SDXL's ``text_encoder``): ``penultimate_unnormed``, the second-to-last layer's output
  without the final LayerNorm, as diffusers' SDXL pipelines take ``hidden_states[-2]``.
* ``PooledPenultimateGraph`` (SDXL's ``text_encoder_2``): ``penultimate_unnormed`` and ``text_embeds``, the projected
  pooled output (the final LayerNorm'd state at the first end-of-text token, times ``text_projection``).

Each wrapper keeps the transformers model's modules under ``text_model`` (and ``text_projection``), so its module
names are the diffusers/PEFT names of the text encoder's weights (what LoRA keys address).
"""

from __future__ import annotations

import torch

from sdtrt.export.component import CheckSize, ComponentExport, TensorSpec, graph_io

MAX_LENGTH = 77


def _text_model(text_encoder: torch.nn.Module) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel; 4.x wraps the same modules in ``.text_model``. CLIPTextModelWithProjection
    # keeps a ``.text_model`` (a CLIPTextModel in 5, a CLIPTextTransformer in 4.x) in both.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return getattr(inner, "text_model", inner)


class TextEncoderGraph(torch.nn.Module):
    """input_ids (B, 77) int32 -> last_hidden_state (B, 77, C) and penultimate_hidden_state (B, 77, C).

    ``penultimate_hidden_state`` is the second-to-last layer's output passed through the final LayerNorm, exactly
    what diffusers feeds the UNet for ``clip_skip=1`` (A1111's "CLIP skip 2").
    """

    OUTPUTS = ("last_hidden_state", "penultimate_hidden_state")

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = _text_model(text_encoder)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_model(input_ids=input_ids.to(torch.int64), output_hidden_states=True)
        penultimate = self.text_model.final_layer_norm(out.hidden_states[-2])
        return out.last_hidden_state, penultimate


class PenultimateGraph(torch.nn.Module):
    """input_ids (B, 77) int32 -> penultimate_unnormed (B, 77, C): ``hidden_states[-2]``, no final LayerNorm (the
    last layer is dead code and leaves the graph)."""

    OUTPUTS = ("penultimate_unnormed",)

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = _text_model(text_encoder)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids.to(torch.int64), output_hidden_states=True)
        return out.hidden_states[-2]


class PooledPenultimateGraph(torch.nn.Module):
    """input_ids (B, 77) int32 -> penultimate_unnormed (B, 77, C) and text_embeds (B, P), the projected pooled
    output that diffusers' SDXL pipelines pass as ``added_cond_kwargs["text_embeds"]``."""

    OUTPUTS = ("penultimate_unnormed", "text_embeds")

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = _text_model(text_encoder)
        self.text_projection = text_encoder.text_projection

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_model(input_ids=input_ids.to(torch.int64), output_hidden_states=True)
        return out.hidden_states[-2], self.text_projection(out.pooler_output)


def text_encoder_export(name: str, module: torch.nn.Module) -> ComponentExport:
    """The export of a text encoder wrapper (one of the classes above) as component ``name``."""
    cfg = module.text_model.config
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    projection = getattr(module, "text_projection", None)
    shapes = {"text_embeds": ("B", projection.out_features)} if projection is not None else {}
    inputs = (TensorSpec("input_ids", ("B", MAX_LENGTH), "int32"),)
    outputs = tuple(TensorSpec(o, shapes.get(o, ("B", MAX_LENGTH, hidden)), "float") for o in module.OUTPUTS)

    def make_inputs(size: CheckSize, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab, (size.batch, MAX_LENGTH), generator=gen, dtype=torch.int64)
        ids[:, 0] = cfg.bos_token_id
        # an end-of-text token where a prompt would end: the pooled output is read there
        ends = torch.randint(2, MAX_LENGTH, (size.batch,), generator=gen)
        ids[torch.arange(size.batch), ends] = cfg.eos_token_id
        return (ids.to(torch.int32),)

    return ComponentExport(
        name=name,
        module=module.eval(),
        io=graph_io(inputs, outputs),
        inputs=inputs,
        outputs=outputs,
        make_inputs=make_inputs,
        check_sizes=(CheckSize(2, 0, 0), CheckSize(1, 0, 0)),
    )
