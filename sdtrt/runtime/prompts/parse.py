"""AUTOMATIC1111's prompt syntax: emphasis brackets and BREAK, parsed into weighted text fragments.

Rules (A1111's ``prompt_parser.parse_prompt_attention``, written afresh here):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; brackets nest multiplicatively.
- ``(text:w)`` multiplies by ``w`` (digits and dots, spaces allowed around it; ``1.2.3`` is refused). Anything
  else after the colon (``(a:b)``) is text, weighted 1.1.
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; a lone ``\\`` is dropped.
- A bracket never closed applies to the rest of the prompt; a closing bracket never opened is literal text.
- ``BREAK`` (the upper-case word) ends the current 75-token chunk.
- Neighbouring fragments of equal weight are merged; an empty prompt is one empty fragment of weight 1.

Per-step conditioning (``[a:b:0.5]`` prompt editing, ``[a|b]`` alternation) and ``AND`` (composable diffusion) are
refused with a clear message by ``check_supported`` rather than passed to CLIP as text.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from sdtrt.errors import UsageError

ROUND = 1.1
SQUARE = 1 / 1.1

_TOKENS = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\     # escapes (a lone backslash is dropped)
    | \( | \[                                   # openers
    | :\s*([+-]?[.\d]+)\s*\)                    # ":w)" closes a round bracket with weight w
    | \) | \]                                   # closers
    | [^\\()\[\]:]+                             # plain text
    | :                                         # a colon that is not a weight
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_AND = re.compile(r"\bAND\b")
_EDIT_WHEN = re.compile(r":\s*[+-]?[.\d]+\s*$")


class Fragment(NamedTuple):
    """A run of prompt text with one weight; ``is_break`` marks a BREAK (its text and weight unused)."""

    text: str
    weight: float
    is_break: bool = False


def parse_attention(prompt: str) -> list[Fragment]:
    """``prompt`` -> weighted fragments, as A1111 parses emphasis (see the module docstring)."""
    res: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for entry in res[start:]:
            entry[1] *= factor

    for m in _TOKENS.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0, False])
        elif text == "(":
            round_open.append(len(res))
        elif text == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:  # "1.2.3" or "." match the pattern but are no number (A1111 fails on them too)
                factor = float(weight)
            except ValueError:
                raise UsageError(f"prompt: the emphasis weight {weight!r} in {text!r} is not a number") from None
            multiply(round_open.pop(), factor)
        elif text == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif text == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        elif weight is not None:  # ":w)" with no "(" open: literal text, as the colon and bracket are
            res.append([text, 1.0, False])
        else:
            for i, part in enumerate(_BREAK.split(text)):
                if i:
                    res.append(["BREAK", -1.0, True])
                res.append([part, 1.0, False])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not res:
        res = [["", 1.0, False]]
    merged: list[list] = [res[0]]
    for entry in res[1:]:
        last = merged[-1]
        if not entry[2] and not last[2] and entry[1] == last[1]:
            last[0] += entry[0]
        else:
            merged.append(entry)
    return [Fragment(t, w, b) for t, w, b in merged]


def check_supported(prompt: str) -> None:
    """``UsageError`` for A1111 syntax that changes the conditioning per step or per sub-prompt (refused, never
    passed to CLIP as text): ``[a:b:0.5]`` / ``[a:0.5]`` / ``[a::0.5]`` prompt editing, ``[a|b]`` alternation, AND."""
    if _AND.search(prompt):
        raise UsageError("prompt: AND (composable diffusion) is not supported; "
                         "write one prompt, or use --prompt-syntax plain to send the text as it is")
    # innermost-first scan of unescaped square brackets, nested brackets' content skipped
    stack: list[list[str]] = [[]]
    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\":
            stack[-1].append(prompt[i : i + 2])
            i += 2
            continue
        if c in "([":
            stack.append([c])
        elif c in ")]" and len(stack) > 1 and stack[-1][0] == ("(" if c == ")" else "["):
            inner = "".join(stack.pop()[1:])
            if c == "]":
                if "|" in inner:
                    raise UsageError(f"prompt: alternation [{inner}] (a different prompt every step) is not supported; "
                                     "use --prompt-syntax plain to send the text as it is")
                if _EDIT_WHEN.search(inner):
                    raise UsageError(f"prompt: prompt editing [{inner}] (a prompt that changes during sampling) is "
                                     "not supported; use --prompt-syntax plain to send the text as it is")
            stack[-1].append("\0")  # a nested group: opaque to the brackets around it
        else:
            stack[-1].append(c)
        i += 1
