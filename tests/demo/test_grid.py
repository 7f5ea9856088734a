"""``python -m sdtrt.demo.grid``: make demo's captioned grid."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdtrt.demo.grid import CELL, main
from sdtrt.runtime.png import save_png


def test_grid_puts_each_image_over_its_prompt(tmp_path):
    paths = []
    for i, rgb in enumerate(((230, 30, 30), (40, 70, 220))):
        paths.append(tmp_path / f"demo-{i}.png")
        save_png(Image.fromarray(np.full((32, 32, 3), rgb, dtype=np.uint8)), paths[-1], f"prompt {i}\nSteps: 30")
    assert main([str(tmp_path / "grid.png"), *map(str, paths)]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert grid.shape[1] == 2 * CELL and grid.shape[0] > CELL
    assert tuple(grid[CELL // 2, CELL // 2]) == (230, 30, 30)  # enlarged, nearest-neighbour: colours kept
    assert tuple(grid[CELL // 2, CELL + CELL // 2]) == (40, 70, 220)
    assert (grid[CELL:] < 128).any()  # caption text drawn under the images


def test_grid_usage(capsys):
    assert main(["only-out.png"]) == 2
    assert "usage" in capsys.readouterr().err
