"""The pieces of guided decoding that need no model: masks applied to logits (numpy on CPU, tensor ops elsewhere: the
same result), `\\d` read as ASCII digits, and a constraint's shape checked when it is made."""

from __future__ import annotations

import pytest
import torch

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.grammar import ascii_digits, mask_logits, new_masks
from sagellm.runtime.engine.guided_params import GuidedDecoding


def test_masks_set_disallowed_logits_to_minus_inf_in_the_given_rows_only() -> None:
    vocab, rows = 70, [0, 2]  # 70: the last word of the mask is partly past the vocabulary
    masks = torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32)
    allowed = [[0, 31, 32, 69], [5]]
    for row, tokens in enumerate(allowed):
        for token in tokens:
            masks[row, token // 32] |= 1 << (token % 32)
    logits = torch.randn(3, vocab)
    expected = logits.clone()
    for row, tokens in zip(rows, allowed):
        keep = torch.full((vocab,), True)
        keep[tokens] = False
        expected[row, keep] = float("-inf")
    on_cpu = logits.clone()
    mask_logits(on_cpu, masks, rows)
    assert torch.equal(on_cpu, expected)
    other_dtype = logits.clone().double()  # not float32: the tensor-op path every other device takes
    mask_logits(other_dtype, masks, rows)
    assert torch.equal(other_dtype.float(), expected)
    assert torch.equal(new_masks(1, vocab), torch.full((1, 3), -1, dtype=torch.int32))


def test_digits_are_ascii_in_and_out_of_classes_and_escapes_stay() -> None:
    assert ascii_digits(r"\d{3}-\d{4}") == "[0-9]{3}-[0-9]{4}"
    assert ascii_digits(r"[\d.]+") == "[0-9.]+"
    assert ascii_digits(r"\\d") == r"\\d"  # a backslash, then the letter d
    assert ascii_digits(r"[a\]\d]\D") == r"[a\]0-9]\D"


def test_a_constraint_has_exactly_one_kind_of_the_right_shape() -> None:
    assert GuidedDecoding(json={"type": "object"}).json == '{"type": "object"}'
    assert GuidedDecoding(choice=["a", "b"]).key == ("choice", '["a", "b"]', None)
    for bad, field in [
        ({}, "guided"),
        ({"regex": "a", "choice": ["a"]}, "guided"),
        ({"choice": []}, "choice"),
        ({"choice": ["a", 1]}, "choice"),
        ({"regex": " "}, "regex"),
        ({"json": 5}, "json"),
        ({"grammar": "x" * 200_001}, "grammar"),
    ]:
        with pytest.raises(FieldError) as refused:
            GuidedDecoding(**bad)
        assert refused.value.field == field, bad
