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
        ("  billing\n", "billing"),
        ("Billing.", "billing"),
        ("BILLING", "billing"),
        ('"shipping"', "shipping"),
        ("`shipping`.", "shipping"),
        ("'Technical Support'", "technical support"),
        ("\u201cbilling.\u201d", "billing"),
        ("technical  support", None),  # inner spaces count, as for the data's own labels
        # a label inside a sentence is not the answer: it is as often denied as meant
        ("Technically, this is a shipping issue", None),
        ("Not billing. It is returns.", None),
        ("The answer is: Technical Support", None),
        ("I think it's about shipping", None),
        ("billing or shipping", None),
        ("billing.\nshipping", None),
        ("no idea", None),
        ("", None),
    ],
)
def test_classification_parse_takes_only_an_answer_that_is_exactly_one_label(text, expected):
    assert classification.parse_answer(text, LABELS) == expected


def test_labels_that_differ_only_by_case_match_exactly_or_not_at_all():
    labels = ["Spam", "spam", "ham"]
    assert classification.parse_answer("Spam", labels) == "Spam" and classification.parse_answer("spam.", labels) == "spam"
    assert classification.parse_answer("SPAM", labels) is None, "two labels match ignoring case: neither is guessed"
    assert classification.parse_answer("HAM", labels) == "ham"
    assert classification.parse_answer("n/a.", ["n/a.", "other"]) == "n/a.", "a label's own period is kept"


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


@pytest.mark.parametrize(("text", "expected"), [
    ('{"order_id": "A12345", "quantity": 2}', {"order_id": "A12345", "quantity": 2}),
    ('  \n{"order_id": null, "quantity": 1}\n', {"order_id": None, "quantity": 1}),
    ('```json\n{"order_id": "A1", "quantity": 3}\n```', {"order_id": "A1", "quantity": 3}),
    ('```\n{"order_id": "A1", "quantity": 3}\n```', {"order_id": "A1", "quantity": 3}),
    ('Sure! {"order_id": "A12345", "quantity": 2} done', None),  # more than one object: not the answer
    ('Not {"order_id": "A1", "quantity": 1}. It is {"order_id": "B2", "quantity": 1}.', None),
    ('{"order_id": "A1", "quantity": 1} {"order_id": "B2", "quantity": 1}', None),
    ('{"order_id": "A1", "quantity": 0}', None),  # schema-invalid
    ("not json at all {", None),
    ('["order_id", "A1"]', None),
])
def test_extraction_parse_takes_only_an_answer_that_is_exactly_one_valid_object(text, expected):
    assert extraction.parse_answer(text, SCHEMA) == expected


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
