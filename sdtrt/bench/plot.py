"""The PNG plot, drawn with Pillow (no plotting dependency): end-to-end latency per contender at the smallest batch
(bar at p50, whisker from min to p90) and throughput against batch size (images/s, p50)."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageDraw, ImageFont

W, H = 1400, 600
PAD = 70
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _ticks(top: float, n: int = 5) -> list[float]:
    return [top * i / n for i in range(n + 1)]


def _latency_panel(d: ImageDraw.ImageDraw, result: dict[str, Any], box: tuple[int, int, int, int], font, small) -> None:
    x0, y0, x1, y1 = box
    b0 = str(min(result["spec"]["batch_sizes"]))
    rows = [(n, c["batches"][b0]["end_to_end_s"]) for n, c in result["contenders"].items() if b0 in c["batches"]]
    label_w = 190
    top = _nice_max(max((s["p90"] for _, s in rows), default=1.0))
    px0 = x0 + label_w
    d.text((x0, y0 - 45), f"End to end latency, batch {b0} (s): bar p50, whisker min-p90", fill="black", font=font)
    for t in _ticks(top):
        x = px0 + (x1 - px0) * t / top
        d.line([(x, y0), (x, y1)], fill="#dddddd")
        d.text((x, y1 + 6), f"{t:.3g}", fill="black", font=small, anchor="ma")
    slot = (y1 - y0) / max(1, len(rows))
    for i, (name, s) in enumerate(rows):
        cy = y0 + slot * (i + 0.5)
        h = min(28, slot * 0.6)
        xp = px0 + (x1 - px0) * s["p50"] / top
        d.rectangle([px0, cy - h / 2, xp, cy + h / 2], fill=COLORS[i % len(COLORS)])
        xa, xb = (px0 + (x1 - px0) * s[k] / top for k in ("min", "p90"))
        d.line([(xa, cy), (xb, cy)], fill="black", width=2)
        d.line([(xa, cy - h / 3), (xa, cy + h / 3)], fill="black", width=2)
        d.line([(xb, cy - h / 3), (xb, cy + h / 3)], fill="black", width=2)
        d.text((px0 - 8, cy), name, fill="black", font=small, anchor="rm")
        d.text((xb + 6, cy), f"{s['p50']:.3g} s", fill="black", font=small, anchor="lm")
    d.line([(px0, y0), (px0, y1), (x1, y1)], fill="black", width=1)


def _throughput_panel(d: ImageDraw.ImageDraw, result: dict[str, Any], box: tuple[int, int, int, int], font, small) -> None:
    x0, y0, x1, y1 = box
    batches = sorted(result["spec"]["batch_sizes"])
    series = [(n, [c["batches"][str(b)]["images_per_s"]["p50"] if str(b) in c["batches"] else None for b in batches])
              for n, c in result["contenders"].items()]
    top = _nice_max(max((x for _, v in series for x in v if x is not None), default=1.0))
    d.text((x0, y0 - 45), "Throughput (images/s, p50) vs batch size", fill="black", font=font)
    for t in _ticks(top):
        y = y1 - (y1 - y0) * t / top
        d.line([(x0, y), (x1, y)], fill="#dddddd")
        d.text((x0 - 6, y), f"{t:.3g}", fill="black", font=small, anchor="rm")

    def xpos(i: int) -> float:
        return x0 + 30 + (x1 - x0 - 60) * (i / max(1, len(batches) - 1))

    for i, b in enumerate(batches):
        d.text((xpos(i), y1 + 6), str(b), fill="black", font=small, anchor="ma")
    for k, (name, values) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        pts = [(xpos(i), y1 - (y1 - y0) * v / top) for i, v in enumerate(values) if v is not None]
        if len(pts) > 1:
            d.line(pts, fill=color, width=3)
        for x, y in pts:
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=color)
        ly = y0 + 4 + 20 * k
        d.rectangle([x0 + 10, ly, x0 + 24, ly + 12], fill=color)
        d.text((x0 + 30, ly + 6), name, fill="black", font=small, anchor="lm")
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black", width=1)


def render_plot(result: dict[str, Any]) -> Image.Image:
    """The two panels side by side, titled with the device and settings."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(18), _font(14)
    env, spec = result["environment"], result["spec"]
    device = env["gpu"]["name"] if env.get("gpu") else f"CPU ({env['cpu_count']} cores)"
    title = (f"sdtrt vs diffusers on {device}: {result['checkpoint'].get('arch') or 'checkpoint'}, "
             f"{spec['width']}x{spec['height']}, {spec['steps']} steps, {spec['runs']} runs, {env['date'][:10]}")
    d.text((PAD, 18), title, fill="black", font=font)
    mid = W // 2
    _latency_panel(d, result, (PAD - 40, 110, mid - 40, H - PAD), font, small)
    _throughput_panel(d, result, (mid + PAD, 110, W - 40, H - PAD), font, small)
    d.text((mid + PAD + (W - 40 - mid - PAD) // 2, H - 30), "batch size", fill="black", font=small, anchor="ma")
    return img
