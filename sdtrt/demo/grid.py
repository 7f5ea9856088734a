"""``python -m sdtrt.demo.grid OUT.png IMAGE...``: the demo's images side by side, each under its prompt.

The prompt is read from each PNG's ``parameters`` text (what ``sdtrt generate`` writes); images are scaled up
with nearest-neighbour so that a 32-px picture stays sharp.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

CELL = 192  # px per image in the grid
CAPTION_LINES = 3


def make_grid(images: list[Path], out: Path) -> None:
    from PIL import Image, ImageDraw

    from sdtrt.fsutil import atomic_path

    line_h = 12
    cap_h = CAPTION_LINES * line_h + 6
    grid = Image.new("RGB", (CELL * len(images), CELL + cap_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, path in enumerate(images):
        with Image.open(path) as im:
            prompt = (im.info.get("parameters") or path.stem).splitlines()[0]
            grid.paste(im.convert("RGB").resize((CELL, CELL), Image.NEAREST), (i * CELL, 0))
        for j, line in enumerate(textwrap.wrap(prompt, width=CELL // 6)[:CAPTION_LINES]):
            draw.text((i * CELL + 4, CELL + 3 + j * line_h), line, fill=(0, 0, 0))
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m sdtrt.demo.grid OUT.png IMAGE...", file=sys.stderr)
        return 2
    make_grid([Path(a) for a in args[1:]], Path(args[0]))
    print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
