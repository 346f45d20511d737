"""Task semantics: answer parsing, target checks, metrics."""

import pytest

from pipeline.tasks import classification, extraction

LABELS = ["billing", "shipping", "technical support"]
SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": ["string", "null"]}, "quantity": {"type": "integer", "minimum": 1}},
    "required": ["order_id", "quantity"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("billing", "billing"),
        ("Billing.", "billing"),
        ("The answer is: Technical Support", "technical support"),
        ("I think it's about shipping", "shipping"),
        ("no idea", None),
    ],
)
def test_classification_parse(text, expected):
    assert classification.parse_answer(text, LABELS) == expected


def test_classification_metrics_count_unparsed_as_wrong():
    m = classification.metrics(["billing", "shipping", "billing"], ["billing", None, "shipping"], LABELS)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["unparsed"] == 1
    # billing: p=1, r=0.5 -> f1 2/3; shipping: p=0, r=0 -> 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_classification_labels_normalised_and_checked():
    assert classification.normalize_target("  billing ") == "billing"
    with pytest.raises(ValueError):
        classification.normalize_target({"a": 1})
    assert "not in the label set" in classification.check_target("Billing", LABELS)


def test_extraction_parse_finds_valid_object_in_text():
    assert extraction.parse_answer('Sure! {"order_id": "A12345", "quantity": 2} done', SCHEMA) == {
        "order_id": "A12345",
        "quantity": 2,
    }
    assert extraction.parse_answer('{"order_id": "A1", "quantity": 0}', SCHEMA) is None  # schema-invalid
    assert extraction.parse_answer("not json at all {", SCHEMA) is None


def test_extraction_check_reports_json_path():
    problem = extraction.check_target({"order_id": None, "quantity": "two"}, SCHEMA)
    assert "$.quantity" in problem


def test_extraction_target_text_follows_schema_order():
    assert extraction.target_text({"quantity": 1, "order_id": None}, SCHEMA) == '{"order_id": null, "quantity": 1}'


def test_extraction_metrics():
    golds = [{"order_id": "A", "quantity": 1}, {"order_id": None, "quantity": 2}]
    preds = [{"order_id": "A", "quantity": 3}, None]
    m = extraction.metrics(golds, preds, SCHEMA)
    assert m["valid_json_rate"] == 0.5
    assert m["exact_match"] == 0.0
    assert m["per_field"] == {"order_id": 0.5, "quantity": 0.0}
    assert m["field_exact_match"] == 0.25
    assert m["field_f1"]["order_id"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["field_f1"]["quantity"]["precision"] == 0.0


def test_extraction_field_f1_counts_nested_keys_and_list_items():
    schema = {"type": "object", "properties": {"intent": {"type": "string"}, "slots": {"type": "object"}}}
    golds = [{"intent": "PlayMusic", "slots": {"artist": "clem burke", "playlist": ["a", "b"]}},
             {"intent": "GetWeather", "slots": {}}]
    preds = [{"intent": "PlayMusic", "slots": {"artist": "clem burke", "playlist": ["b"], "year": "1999"}},
             {"intent": "RateBook", "slots": {}}]
    m = extraction.metrics(golds, preds, schema)
    slots = m["field_f1"]["slots"]  # gold: artist, playlist a, playlist b; predicted: artist, playlist b, year
    assert (slots["precision"], slots["recall"], slots["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert m["field_f1"]["intent"]["f1"] == 0.5
    assert m["micro_f1"] == pytest.approx(2 * (3 / 5) * (3 / 5) / (6 / 5))  # 3 of 5 predicted, 3 of 5 gold
