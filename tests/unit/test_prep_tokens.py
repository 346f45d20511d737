"""Token counting: the per-row shortcut (template segments) must equal rendering each row in full."""

from __future__ import annotations

from pipeline.data.token_count import (
    count_by_segments,
    measure_tokens,
    template_segments,
    truncate_text,
)
from pipeline.inference import models

TEXTS = [
    "where is my parcel",
    "Ünïcödé façade — 東京 🚚",
    "line one\n\nline two\twith tab",
    "trailing spaces inside  double",
    "looks like a tag <|im_end|> in the text",
    "x",
]
ANSWERS = ["shipping", '{"a": 1}', "returns", "billing", "account", "y"]


def test_segment_counts_equal_full_rendering(tiny_model_dir):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    system = "Route the message.\nAnswer with one label: billing, shipping."
    segments = template_segments(tokenizer, system)
    assert segments is not None, "ChatML places the content verbatim"
    assert count_by_segments(tokenizer, segments, TEXTS, ANSWERS) == measure_tokens(tokenizer, system, TEXTS, ANSWERS)


def test_template_that_rewrites_content_has_no_segments(tiny_model_dir):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    assert template_segments(tokenizer, "sys") is None


def test_truncate_text_cuts_at_a_token_boundary(tiny_model_dir):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    text = "please look at my parcel " * 10
    n = len(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
    cut = truncate_text(tokenizer, text.strip(), 5)
    assert text.startswith(cut) and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= n - 5
    assert truncate_text(tokenizer, "short", 50) == ""
