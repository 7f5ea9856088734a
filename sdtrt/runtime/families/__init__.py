"""Model families: a request -> the UNet's static conditioning inputs (see ``base``). Chosen once, at load, from
the manifest's ``model.family``; the denoising loop never asks which family it runs."""

from __future__ import annotations

from collections.abc import Mapping

from sdtrt.checkpoint.model import TOKENIZER_DIRS
from sdtrt.errors import CheckpointError
from sdtrt.runtime.families.base import Family
from sdtrt.runtime.families.sd import SDFamily
from sdtrt.runtime.families.sdxl import SDXLFamily
from sdtrt.runtime.families.text import Encoded, TextEncoder

FAMILIES: dict[str, type] = {"sd1": SDFamily, "sd2": SDFamily, "sdxl": SDXLFamily, "sdxl-refiner": SDXLFamily}


def text_encoder_names(model: Mapping) -> tuple[str, ...]:
    """The text encoder components of an export (workdirs from before SDXL name none: theirs is ``text_encoder``)."""
    return tuple(model.get("text_encoders", ("text_encoder",)))


def make_family(model: Mapping, encoders: Mapping[str, TextEncoder]) -> Family:
    name = str(model.get("family", "sd1"))
    cls = FAMILIES.get(name)
    if cls is None:
        raise CheckpointError(f"this sdtrt does not know the model family {name!r} of this export; "
                              f"known: {', '.join(FAMILIES)}")
    return cls(name, model, encoders)


__all__ = ["FAMILIES", "TOKENIZER_DIRS", "Encoded", "Family", "TextEncoder", "make_family", "text_encoder_names"]
