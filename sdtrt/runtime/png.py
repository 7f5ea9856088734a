"""PNG output with A1111's ``parameters`` text chunk, written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdtrt.errors import UsageError
from sdtrt.fsutil import atomic_path


def save_png(image, path: str | Path, parameters: str) -> Path:
    """Write ``image`` (PIL) to ``path`` with a ``parameters`` tEXt chunk; the file appears whole or not at all."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG written by sdtrt or A1111 (None when absent)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.info.get("parameters")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"{path}: not a readable image ({e})") from None


def output_paths(out: str | Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for a batch."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"output must be a .png path, got {out}")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_result(result: Any, out: str | Path) -> list[Path]:
    """Every image of a pipeline ``Result`` as a PNG carrying its own infotext as the ``parameters`` chunk (the
    text A1111's "PNG Info" reads): ``out.png`` for one image, ``out-0.png``, ``out-1.png``, ... for several; each
    file written atomically. Returns the paths written."""
    return save_images(result.images, result.infotexts, out)


def save_images(images: Sequence[Any], infotexts: Sequence[str], out: str | Path) -> list[Path]:
    """``save_result`` for parallel lists of PIL images and their infotexts."""
    if len(images) != len(infotexts):
        raise UsageError(f"{len(images)} images but {len(infotexts)} infotexts")
    paths = output_paths(out, len(images))
    for image, text, path in zip(images, infotexts, paths, strict=True):
        save_png(image, path, text)
    return paths
