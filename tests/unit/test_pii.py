"""PII detection and redaction on plain strings: each kind with exact spans, the checksums, and ticket-text negatives."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from pipeline.data import pii
from pipeline.data.pii import Match


def spans(text: str, kinds=pii.KINDS, **kw) -> list[tuple[str, str]]:
    return [(m.kind, text[m.start : m.end]) for m in pii.find(text, kinds, **kw)]


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("email", "jane.doe+tickets@mail.example.co.uk"),
        ("phone", "+44 20 7946 0958"),
        ("phone", "+1 (415) 555-2671"),
        ("card", "4111 1111 1111 1111"),
        ("card", "4111-1111-1111-1111"),
        ("card", "5555555555554444"),
        ("card", "3782 822463 10005"),
        ("iban", "DE89 3704 0044 0532 0130 00"),
        ("iban", "GB82WEST12345698765432"),
        ("iban", "NO9386011117947"),
        ("ip", "192.168.1.20"),
        ("ip", "2001:db8::8a2e:370:7334"),
        ("ip", "::ffff:192.0.2.1"),
        ("ip", "::1"),
        ("us_ssn", "123-45-6789"),
        ("us_ssn", "219 09 9999"),
        ("uk_nino", "AB 12 34 56 C"),
        ("uk_nino", "ce123456a"),
        ("de_tax_id", "36 574 261 809"),
        ("de_tax_id", "86095742719"),
    ],
)
def test_each_kind_is_found_in_a_sentence_with_its_exact_span(kind, value):
    text = f"Hi, it's me again: {value}. Please help!"
    start = text.index(value)
    assert pii.find(text, pii.KINDS) == [Match(kind, start, start + len(value))]


def test_matches_in_a_ticket_are_sorted_and_do_not_overlap():
    text = (
        "From jane@example.com (ip 10.0.0.7): card 4111 1111 1111 1111 12/25 was charged twice, "
        "refund to DE89370400440532013000 or call +49 30 901820."
    )
    found = pii.find(text, pii.KINDS)
    assert [(m.kind, text[m.start : m.end]) for m in found] == [
        ("email", "jane@example.com"),
        ("ip", "10.0.0.7"),
        ("card", "4111 1111 1111 1111"),
        ("iban", "DE89370400440532013000"),
        ("phone", "+49 30 901820"),
    ]
    assert all(a.end <= b.start for a, b in zip(found, found[1:]))


def test_the_longest_match_wins_where_two_overlap():
    # the IPv4 tail of an IPv6 address is not a second address
    assert spans("peer ::ffff:192.0.2.1 dropped") == [("ip", "::ffff:192.0.2.1")]


def test_national_format_phone_numbers_need_a_region():
    text = "call (415) 555-2671 or 415-555-2671"
    assert pii.find(text, ["phone"]) == []
    assert spans(text, ["phone"], region="US") == [("phone", "(415) 555-2671"), ("phone", "415-555-2671")]
    assert spans("ring 030 901820", ["phone"], region="de") == [("phone", "030 901820")]
    assert pii.find("ticket TKT-415-555-2671 and ref 4155552671-B", ["phone"], region="US") == []
    with pytest.raises(ValueError, match="region"):
        pii.find(text, ["phone"], region="XX")


@pytest.mark.parametrize(
    "value",
    [
        "4111 1111 1111 1112",  # Luhn fails
        "4111111111111112",
        "4111 1111 1111 111",  # 15 digits, Luhn fails
        "9612 0190 1234 5670",  # Luhn passes but no card network starts with 9
        "4111 11 1111 1111 1111",  # not a card grouping
        "4111 1111-1111 1111",  # mixed separators
    ],
)
def test_card_numbers_failing_their_checks_are_not_found(value):
    assert pii.find(f"card {value} please", ["card"]) == []


@pytest.mark.parametrize(
    "value",
    [
        "DE89 3704 0044 0532 0130 01",  # mod-97 fails
        "GB82WEST12345698765433",
        "DE89 3704 0044 0532 0130 0",  # one short for DE
        "XY89370400440532013000",  # not a registry country
    ],
)
def test_ibans_failing_their_checks_are_not_found(value):
    assert pii.find(f"pay to {value} today", ["iban"]) == []


@pytest.mark.parametrize(
    "value", ["999.1.1.1", "256.0.0.1", "01.2.3.4", "1.2.3.4.5", "1.2.3", "::", "1:2:3", "bad::face", "00:1A:2B:3C:4D:5E"]
)
def test_invalid_ip_addresses_are_not_found(value):
    assert pii.find(f"host {value} down", ["ip"]) == []


@pytest.mark.parametrize(
    "value", ["000-12-3456", "666-12-3456", "923-12-3456", "123-00-4567", "123-45-0000", "123456789", "123-45 6789"]
)
def test_never_issued_or_unseparated_ssns_are_not_found(value):
    assert pii.find(f"ssn {value} on file", ["us_ssn"]) == []


@pytest.mark.parametrize("value", ["QQ 12 34 56 C", "GB123456A", "DA123456A", "AB123456E", "AB12345C"])
def test_malformed_ninos_are_not_found(value):
    assert pii.find(f"nino {value} on file", ["uk_nino"]) == []


@pytest.mark.parametrize("value", ["36574261890", "36 574 261 808", "06574261809", "11111111111"])
def test_german_tax_ids_failing_their_checks_are_not_found(value):
    assert pii.find(f"IdNr {value} bitte", ["de_tax_id"]) == []


@pytest.mark.parametrize(
    "text",
    [
        "Order #A-10234 still not shipped, see order 10234-55 and ticket TKT-2024-000123.",
        "Delivered 2024-03-05 at 10:30:00 (UTC+01:00), or was it 05/03/2024 14:45?",
        "I paid $19.99 + $4.50 shipping = $24.49, now €1.299,00 on the invoice.",
        "Running app v1.2.3.4 (build 20240305.1) on iOS 17.4.1, error 0x80070005.",
        "UPS 1Z999AA10123456784, USPS 9400 1000 0000 0000 0000 00, FedEx 123456789012.",
        "Call me at extension 4521 between 9-5, room 3B, 2 of 3 items, ratio 16:9.",
        "C++ std::vector and Foo::bar, commit 9fceb02d0ae598e95dc970b74767f19372d61af8.",
    ],
)
def test_normal_ticket_text_has_no_pii(text):
    assert pii.find(text, pii.KINDS, region="US") == []


def test_a_bare_four_part_version_is_taken_for_an_ip():
    # documented: a dotted quad is an address unless a "v" or a fifth part says otherwise
    assert spans("upgraded to version 1.2.3.4 today", ["ip"]) == [("ip", "1.2.3.4")]
    assert pii.find("upgraded to v1.2.3.4 today", ["ip"]) == []


def test_national_ids_are_only_found_when_listed():
    text = "SSN 123-45-6789, NINO AB123456C"
    assert pii.find(text) == []
    assert spans(text, "us_ssn") == [("us_ssn", "123-45-6789")]


def test_redact_replaces_each_match_and_counts_by_kind():
    text = (
        "jane@example.com / bob@example.org paid with 4111 1111 1111 1111 from 10.0.0.7, "
        "IBAN GB82 WEST 1234 5698 7654 32, SSN 123-45-6789, call +44 20 7946 0958."
    )
    redacted, counts = pii.redact(text, pii.KINDS)
    assert redacted == (
        "[EMAIL] / [EMAIL] paid with [CARD] from [IP], IBAN [IBAN], SSN [US_SSN], call [PHONE]."
    )
    assert counts == Counter(email=2, card=1, ip=1, iban=1, us_ssn=1, phone=1)
    assert pii.redact(redacted, pii.KINDS) == (redacted, Counter())


def test_redact_is_idempotent_and_placeholders_are_never_found():
    placeholders = " ".join(pii.PLACEHOLDERS.values())
    assert set(pii.PLACEHOLDERS) == set(pii.KINDS)
    assert pii.find(placeholders, pii.KINDS, region="US") == []
    samples = [
        "mail a@b.co, +1 415 555 2671,4111111111111111;::1",
        "jane@example.com4111111111111111 10.0.0.1:8080 [2001:db8::1]:443",
        "nothing to see here",
        "",
    ]
    for text in samples:
        once, _ = pii.redact(text, pii.KINDS, region="US")
        assert pii.redact(once, pii.KINDS, region="US")[0] == once
        assert pii.find(once, pii.KINDS, region="US") == []


def test_an_unknown_kind_is_a_value_error_naming_the_valid_ones():
    with pytest.raises(ValueError) as err:
        pii.find("text", ["email", "fr_nir"])
    message = str(err.value)
    assert "'fr_nir'" in message
    assert all(kind in message for kind in pii.KINDS)
    with pytest.raises(ValueError, match="fr_nir"):
        pii.redact("text", "fr_nir")


def test_the_recipe_offers_exactly_the_kinds_this_module_finds():
    from typing import get_args

    from pipeline.recipe.schema import DataSection

    annotation = DataSection.model_fields["pii_kinds"].annotation
    (item,) = get_args(annotation)
    assert set(get_args(item)) == set(pii.KINDS)
    assert DataSection.model_fields["pii_kinds"].default == list(pii.DEFAULT_KINDS)


# the forms people write personal data in: (kind, value as written); each must be found whole
WRITTEN_FORMS = [
    ("card", "4111.1111.1111.1111"),
    ("card", "4111/1111/1111/1111"),
    ("card", "4111  1111  1111  1111"),
    ("card", "4111\u00a01111\u00a01111\u00a01111"),
    ("card", "4111\u202f1111\u202f1111\u202f1111"),
    ("card", "4111\u2009- 1111 - 1111 - 1111"),
    ("card", "5500 0000 0000 0004"),
    ("card", "3782.822463.10005"),
    ("email", "jane.doe @ example.com"),
    ("email", "jane.doe@ example.com"),
    ("email", "jane.doe\u00a0@\u00a0example.com"),
    ("email", "j.doe+tickets  @  mail.example.co.uk"),
    ("phone", "+44.20.7946.0958"),
    ("phone", "+44/20/7946/0958"),
    ("phone", "+44\u00a020\u00a07946\u00a00958"),
    ("phone", "+1\u202f415\u202f555\u202f2671"),
    ("phone", "+44  20  7946  0958"),
]

# look-alikes that are not personal data and must stay as they are
NOT_PII = [
    "shipped on 2024.03.05 or 05/03/2024",
    "upgrade from 1.2.3 to 10.4.11",
    "order 1234.5678 and #A-10234, ref 2024/000123",
    "it cost $1,234.56 (1.234,56 EUR), 4 items @ $3.50 each",
    "meet at 10:30:00 in room 4111",
    "tracking 1Z999AA10123456784",
    "card ending 4111.1111.1111.1112",  # fails Luhn
    "mixed 4111-1111 1111.1111",  # one kind of separator only, or not a card
    "ping @ops or @ 10am, rate 3 @ 2.5",
]


@pytest.mark.parametrize("kind, value", WRITTEN_FORMS)
def test_personal_data_is_found_in_the_forms_people_write_it(kind, value):
    text = f"details: {value} thanks"
    assert spans(text, pii.DEFAULT_KINDS) == [(kind, value)]
    redacted, counts = pii.redact(text, pii.DEFAULT_KINDS, key=b"k" * 32)
    assert counts == Counter({kind: 1}) and value not in redacted


@pytest.mark.parametrize("text", NOT_PII)
def test_look_alikes_are_not_redacted(text):
    assert pii.find(text, pii.DEFAULT_KINDS) == []
    assert pii.redact(text, pii.DEFAULT_KINDS, key=b"k" * 32) == (text, Counter())


def test_pseudonyms_are_one_per_value_however_written_and_differ_between_values():
    key = b"k" * 32
    emails = [f"customer{i}@example.com" for i in range(20)]
    tokens = [pii.redact(f"from {e}", ["email"], key=key)[0] for e in emails]
    assert len(set(tokens)) == 20, "20 people are 20 pseudonyms, not one [EMAIL]"
    assert all(re.fullmatch(r"from \[EMAIL_[a-p]{8}\]", t) for t in tokens)
    same = {pii.redact(v, ["email", "card"], key=key)[0] for v in ("Customer3 @ Example.com", "customer3@example.com")}
    assert same == {tokens[3].removeprefix("from ")}
    cards = {pii.redact(v, ["card"], key=key)[0] for v in ("4111 1111 1111 1111", "4111.1111.1111.1111", "4111111111111111")}
    assert len(cards) == 1
    assert pii.redact("customer3@example.com", ["email"], key=b"o" * 32)[0] != tokens[3].removeprefix("from "), \
        "another key, another pseudonym: without the key a guess cannot be confirmed"
    once = pii.redact("a@b.co, +1 415 555 2671, 4111111111111111, ::1", pii.KINDS, region="US", key=key)[0]
    assert pii.redact(once, pii.KINDS, region="US", key=key) == (once, Counter())
