"""Rules that several task types share."""

from __future__ import annotations

import math


def check_no_class_minimum(section) -> None:
    """A task without classes takes no `min_examples_per_class` (unless it is the default, which is unused)."""
    if section.min_examples_per_class != type(section).model_fields["min_examples_per_class"].default:
        raise ValueError("`min_examples_per_class` applies to classification tasks only; remove it")


def mean_token_probability(token_logprobs: list[float]) -> float:
    """The geometric mean of an answer's token probabilities: comparable across answers of different lengths."""
    return math.exp(sum(token_logprobs) / len(token_logprobs)) if token_logprobs else 0.0
