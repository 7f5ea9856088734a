"""PNG output with A1111's ``parameters`` text chunk, written atomically."""

from __future__ import annotations

from pathlib import Path

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
