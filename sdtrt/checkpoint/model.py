"""The loaded checkpoint: torch modules plus what the exporter and runtime need to know about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# each text encoder component and the folder its tokenizer is saved in (diffusers' layout, and a WORKDIR's)
TOKENIZER_DIRS: dict[str, str] = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass(frozen=True)
class Checkpoint:
    """A Stable Diffusion checkpoint loaded into torch modules (fp32, CPU, eval mode).

    ``format`` is ``diffusers`` (a folder) or ``single-file`` (original CompVis/A1111 key layout).
    ``arch`` names the known architecture it matched (``sd15``, ``tiny-sd1``, ...) or is ``None`` for a custom one.
    ``family`` is ``sd1``, ``sd2``, ``sdxl`` (two text encoders) or ``sdxl-refiner`` (``text_encoder_2`` only:
    ``text_encoder`` and ``tokenizer`` are None). ``pipeline_config`` holds ``model_index.json``'s settings that
    are not components (``force_zeros_for_empty_prompt``, ``requires_aesthetics_score``).
    """

    source: Path
    format: str
    arch: str | None
    family: str
    text_encoder: Any  # transformers.CLIPTextModel; None for sdxl-refiner
    tokenizer: Any  # transformers.CLIPTokenizer; None for sdxl-refiner
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    scheduler_config: dict[str, Any]
    notes: tuple[str, ...] = ()  # what loading chose for the user (EMA or not, another VAE), for the summary
    vae_source: Path | None = None  # the --vae file or folder, when the VAE is not the checkpoint's own
    text_encoder_2: Any = None  # SDXL: transformers.CLIPTextModelWithProjection (OpenCLIP ViT-bigG)
    tokenizer_2: Any = None  # SDXL: its tokenizer (pads with "!")
    pipeline_config: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")
