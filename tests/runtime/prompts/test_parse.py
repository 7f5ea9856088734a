"""A1111's emphasis parser, case by case. The expected values are A1111's own (the doctests of
``modules/prompt_parser.py``'s ``parse_prompt_attention`` and its behaviour on the other cases)."""

from __future__ import annotations

import pytest

from sdtrt.errors import UsageError
from sdtrt.runtime.prompts import check_supported, parse_attention


def _pairs(prompt: str) -> list[tuple[str, float]]:
    return [(f.text, round(f.weight, 10)) if not f.is_break else ("BREAK", -1) for f in parse_attention(prompt)]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # A1111's doctests
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
          ("sky", 1.4641), (".", 1.1)]),
        # the rest of the rules
        ("[faded]", [("faded", round(1 / 1.1, 10))]),
        ("[[x]]", [("x", round(1 / 1.1 / 1.1, 10))]),
        ("((word))", [("word", 1.21)]),
        ("(word:1.2)", [("word", 1.2)]),
        ("(word: 1.2 )", [("word", 1.2)]),  # spaces around the weight (A1111 >= 1.6)
        ("(x:1.0)", [("x", 1.0)]),
        ("(x:-.5)", [("x", -0.5)]),
        ("(a:b)", [("a:b", 1.1)]),  # not a number after the colon: text
        ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight with no bracket open: text
        ("a ) b ]", [("a ) b ]", 1.0)]),  # closers never opened: text
        ("\\\\ and \\ alone", [("\\ and  alone", 1.0)]),  # an escaped backslash stays; a lone one is dropped
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1), ("b", 1.1)]),
        ("aBREAKb, Break", [("aBREAKb, Break", 1.0)]),  # only the upper-case word
    ],
)
def test_parse_attention_as_a1111(prompt, expected):
    assert _pairs(prompt) == expected


@pytest.mark.parametrize("prompt", ["(x:1.2.3)", "(x:.)", "(x:..5)"])
def test_a_weight_that_is_not_a_number_is_refused(prompt):
    # A1111's pattern takes digits and dots, then float() fails on these; we say so in one line
    with pytest.raises(UsageError, match=r"^prompt: the emphasis weight '.*' in '.*' is not a number$"):
        parse_attention(prompt)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a [cat:dog:0.5]", r"^prompt: prompt editing \[cat:dog:0.5\] .* is not supported"),
        ("a [cat:10]", r"^prompt: prompt editing \[cat:10\]"),
        ("a [cat::0.3]", r"^prompt: prompt editing \[cat::0.3\]"),
        ("a [(cat:1.2):dog: 4 ]", r"^prompt: prompt editing"),
        ("a [cat|dog]", r"^prompt: alternation \[cat\|dog\]"),
        ("a cat AND a dog", r"^prompt: AND \(composable diffusion\) is not supported"),
    ],
)
def test_per_step_syntax_is_refused(prompt, message):
    with pytest.raises(UsageError, match=message):
        check_supported(prompt)


@pytest.mark.parametrize("prompt", ["a (cat:1.2)", "[cat]", "\\[cat:dog:0.5\\]", "a: b | c", "android, band", "[a:b]"])
def test_ordinary_syntax_passes(prompt):
    check_supported(prompt)
