"""A1111's reader of the ``parameters`` text, written here so tests check what other tools will read back.

The rules of AUTOMATIC1111's ``modules/infotext_utils.parse_generation_parameters`` (stable-diffusion-webui 1.x):
the last line holds ``key: value`` pairs separated by commas (a value may be a JSON-quoted string) and counts as
parameters only if it has at least 3 of them; the lines before it are the prompt, up to a line starting with
``Negative prompt:``; a ``WxH`` value becomes ``key-1`` (width) and ``key-2`` (height); a missing ``Clip skip``
means 1. Independent of sdtrt's own code on purpose.
"""

from __future__ import annotations

import json
import re

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_generation_parameters(text: str) -> dict[str, str]:
    """``{"Prompt": ..., "Negative prompt": ..., "Steps": "20", "Size-1": width, "Size-2": height, ...}``."""
    res: dict[str, str] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    for key, value in RE_PARAM.findall(lastline):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        m = RE_IMAGESIZE.match(value)
        if m is not None:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        else:
            res[key] = value
    res.setdefault("Clip skip", "1")
    return res
