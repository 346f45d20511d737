"""Find personal data in text, so that prep can redact or reject a row before it leaves.

Pure functions, no I/O: `find(text, kinds)` gives the matches, `redact(text, kinds)`
replaces each with a placeholder and counts them by kind; given a key, each value with its own
pseudonym (`pseudonym`: a keyed hash), so distinct people stay distinct.

"Spaces" below are any of the spaces people type or paste: ASCII space and tab, NBSP
(U+00A0), the Unicode fixed-width, thin and narrow spaces and the ideographic space; never a
line break.

Kinds (`KINDS`):

- ``email``: ``local@domain.tld`` with an ASCII local part and a dotted domain whose
  last label is 2-63 letters; up to three spaces either side of the ``@`` (``jane @ example.com``).
- ``phone``: found and validated by `phonenumbers` (Google's libphonenumber, offline,
  leniency VALID: the number must be a real, allocated number range for its country).
  With ``region=None`` (the default) only numbers written in international format
  (``+44 20 7946 0958``, ``+1 (415) 555-2671``) are found, in any country. Give
  ``region="US"`` (any ISO 3166 code libphonenumber knows) to also find national-format
  numbers of that one country (``(415) 555-2671``); the cost is that a 10-digit order
  number that happens to be a valid US number (``4155552671``) is then a phone number.
  Groups may be separated by spaces, dots, dashes, slashes or parentheses (``+44.20.7946.0958``,
  ``+44/20/7946/0958``, ``+1\u202f415\u202f555\u202f2671``).
  A number glued to a word by a dash or slash (``TKT-2024-000123``) is not a phone.
- ``card``: payment card numbers, 13-19 digits, first digit 2-6 (Mastercard, Amex,
  Diners, JCB, Visa, Discover, UnionPay, Maestro), Luhn-checked; either one unbroken
  run of digits or groups of 3-6 digits, the first of 4, joined by one kind of
  separator throughout: spaces (any number), a dash, a dot or a slash (spaces around it
  allowed): ``4111 1111 1111 1111``, ``3782-822463-10005``, ``4111.1111.1111.1111``,
  ``4111/1111/1111/1111``, ``4111  1111\u00a01111 1111``, ``4111 - 1111 - 1111 - 1111``.
- ``iban``: two letters of a country in the SWIFT IBAN registry, two check digits and
  exactly that country's length, with or without single spaces, ISO 13616 mod-97 checked.
- ``ip``: IPv4 dotted quads and IPv6 addresses (with ``::`` compression or an embedded
  IPv4 tail), validated by `ipaddress`.

National ids, only when asked for (`NATIONAL_IDS`; `DEFAULT_KINDS` leaves them out):

- ``us_ssn``: ``123-45-6789`` or ``123 45 6789`` (one separator, used twice); area 000,
  666 and 900-999, group 00 and serial 0000 are never issued and are not matched.
- ``uk_nino``: National Insurance number, ``AB 12 34 56 C`` or ``AB123456C``, with
  HMRC's prefix rules (first letter not D F I Q U V, second not D F I O Q U V, not BG GB
  KN NK NT TN ZZ) and a suffix letter A-D.
- ``de_tax_id``: the German Steuer-Identifikationsnummer (IdNr, 11 digits, first not 0,
  ``12345678901`` or ``12 345 678 901``), ISO 7064 MOD 11,10 check digit and the rule
  that exactly one digit of the first ten occurs twice or three times (three in a row,
  which the BZSt does not issue, is still matched: better redacted than leaked).
  Not the per-state Steuernummer (``12/345/67890``), which has no check digit.

Any other kind is a `ValueError` that names the valid ones.

What it misses, by design or because no offline rule can tell:

- names, postal addresses, dates of birth, account logins, free-form ids (customer,
  order, passport, driving licence, national ids not listed above), and anything
  written out in words ("four one one one ...") or split over lines;
- phone numbers in national format unless ``region`` is that country, numbers written
  with an international dialling prefix (``0044 ...``) without ``region``, and numbers
  libphonenumber does not consider valid (a wrong length, a range never allocated);
- cards whose first digit is 0, 1, 7, 8 or 9, cards grouped unusually (``41 11 ...``)
  or with mixed separators (``4111-1111 1111.1111``); e-mails written with ``[at]``/``(dot)``; IBANs of
  countries outside the registry table (`_IBAN_LENGTHS`) and IBANs broken by dashes; bare nine-digit SSNs
  (too many order and zip+4 numbers look the same); NINOs without their suffix letter;
- MAC addresses, hostnames and URLs (only the e-mail or IP inside one is found),
  e-mails with non-ASCII local parts or IP-literal domains, and non-ASCII digits.

What it deliberately accepts as a cost: every valid dotted quad is an IP, including
a four-part version string written without a prefix (``version 1.2.3.4``); a ``v``
prefix (``v1.2.3.4``) or a fifth part (``1.2.3.4.5``) keeps it from matching. About
one random 13-19 digit number in ten passes Luhn, so an id of that length starting with
2-6 is taken for a card. Dates (``2024-03-05``), times (``10:30:00``), prices
(``$19.99``, ``1.234,56``), version numbers (``1.2.3``), order numbers (``#A-10234``,
``1234.5678``) and tracking numbers (UPS ``1Z...``, USPS 20-22 digits) are not matched by
any kind.

Placeholders are ``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``, ``[IP]``,
``[US_SSN]``, ``[UK_NINO]`` and ``[DE_TAX_ID]`` (`PLACEHOLDERS`), or with a key the
kind and eight letters (``[EMAIL_kfbmdaoc]``): ASCII letters and ``_`` in brackets,
which no detector matches, so `redact` is idempotent.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers

GENERIC_KINDS = ("email", "phone", "card", "iban", "ip")
NATIONAL_IDS = ("us_ssn", "uk_nino", "de_tax_id")
KINDS = GENERIC_KINDS + NATIONAL_IDS
DEFAULT_KINDS = GENERIC_KINDS
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in KINDS}

# when two kinds claim the same span, the one with the stricter check wins
_PRIORITY = {kind: i for i, kind in enumerate(("card", "iban", "us_ssn", "uk_nino", "de_tax_id", "email", "ip", "phone"))}


@dataclass(frozen=True, slots=True)
class Match:
    """One finding: `text[start:end]` is personal data of `kind`."""

    kind: str
    start: int
    end: int


def check_kinds(kinds: Iterable[str] | str) -> tuple[str, ...]:
    """The kinds as a tuple, or a ValueError naming the valid ones (a lone string is one kind)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(
            f"unknown PII kind(s) {', '.join(map(repr, unknown))}: valid kinds are "
            f"{', '.join(GENERIC_KINDS)}, and the national ids {', '.join(NATIONAL_IDS)}"
        )
    return kinds


def find(text: str, kinds: Iterable[str] | str = DEFAULT_KINDS, *, region: str | None = None) -> list[Match]:
    """The matches of `kinds` in `text`: non-overlapping, leftmost-longest, sorted by position.

    `region` (ISO 3166 alpha-2, e.g. "US") also finds phone numbers written in that
    country's national format; None finds only international-format numbers.
    """
    kinds = check_kinds(kinds)
    region = _check_region(region)
    candidates: list[Match] = []
    for kind in dict.fromkeys(kinds):
        if kind == "phone":
            candidates += _phones(text, region)
        else:
            candidates += _DETECTORS[kind](text)
    candidates.sort(key=lambda m: (m.start, m.start - m.end, _PRIORITY[m.kind]))
    chosen: list[Match] = []
    for m in candidates:
        if not chosen or m.start >= chosen[-1].end:
            chosen.append(m)
    return chosen


def redact(
    text: str, kinds: Iterable[str] | str = DEFAULT_KINDS, *, region: str | None = None, key: bytes | None = None
) -> tuple[str, Counter[str]]:
    """`text` with each match replaced by its placeholder, and the number replaced per kind.

    With a `key`, each find becomes its pseudonym (`pseudonym`): the same value, however it is written, gives
    the same placeholder and different values different ones, so rows that differ only in whose e-mail they
    hold stay different rows. Without one, every find of a kind becomes its one placeholder (`[EMAIL]`).

    Runs until nothing is found, so that text joined up by a replacement is checked
    too and `redact(redact(x)[0])[0] == redact(x)[0]` always holds. It ends: every match
    holds a digit, "@" or ":", and a placeholder holds none.
    """
    kinds = check_kinds(kinds)
    counts: Counter[str] = Counter()
    while matches := find(text, kinds, region=region):
        parts, pos = [], 0
        for m in matches:
            value = text[m.start : m.end]
            parts += [text[pos : m.start], PLACEHOLDERS[m.kind] if key is None else pseudonym(m.kind, value, key)]
            counts[m.kind] += 1
            pos = m.end
        parts.append(text[pos:])
        text = "".join(parts)
    return text, counts


PSEUDONYM_LETTERS = 8  # 32 bits: two of a million distinct values share a pseudonym about once in 10^4 pairs
_HEX_AS_LETTERS = str.maketrans("0123456789abcdef", "abcdefghijklmnop")


def pseudonym(kind: str, value: str, key: bytes) -> str:
    """The placeholder of one find under `key`: `[EMAIL_kfbmdaoc]`, an HMAC-SHA256 of the kind and the value as
    written without its spacing and case (`Jane @ X.com` and `jane@x.com` are one person), cut to 8 hex digits
    spelled with the letters a-p, so that a placeholder holds no digit and is never found again. Without the key
    the value cannot be recovered, nor confirmed by hashing guesses."""
    canonical = _canonical(kind, value)
    digest = hmac.new(key, f"{kind}\0{canonical}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return f"[{kind.upper()}_{digest[:PSEUDONYM_LETTERS].translate(_HEX_AS_LETTERS)}]"


def _canonical(kind: str, value: str) -> str:
    if kind == "ip":
        return str(ipaddress.ip_address(value))  # one spelling of an IPv6 address
    if kind == "email":
        return "".join(value.split()).casefold()
    keep_plus = value.lstrip().startswith(("+", "\uff0b"))  # +44 ... and 44 ... are not the same number
    return ("+" if keep_plus else "") + "".join(c for c in value if c.isalnum()).upper()


def _check_region(region: str | None) -> str | None:
    if region is None:
        return None
    code = region.upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown phone region {region!r}: give an ISO 3166 alpha-2 code such as 'US', or None")
    return code


# ---- detectors: each returns every validated candidate; `find` resolves overlaps


# every Unicode space (NBSP, thin and narrow spaces, ideographic space) and the slash, as libphonenumber's matcher
# sees them: a plain space. One character for one, so the matches' positions hold in the original text.
_PHONE_SEPARATORS = str.maketrans({c: " " for c in "\t/\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                                                  "\u2007\u2008\u2009\u200a\u202f\u205f\u3000"})


def _phones(text: str, region: str | None) -> list[Match]:
    if region is None and "+" not in text and "\uff0b" not in text:
        return []  # only international format without a region, and that starts with a plus
    spaced = text.translate(_PHONE_SEPARATORS)
    matcher = phonenumbers.PhoneNumberMatcher(spaced, region, leniency=phonenumbers.Leniency.VALID)
    return [Match("phone", m.start, m.end) for m in matcher if not _inside_token(text, m.start, m.end)]


def _inside_token(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] is glued to a word or number, as "2024-000123" in "TKT-2024-000123"."""
    before, after = text[max(0, start - 2) : start], text[end : end + 2]
    glued_before = before[-1:].isalnum() or (len(before) == 2 and before[1] in "-_/." and before[0].isalnum())
    glued_after = after[:1].isalnum() or (len(after) == 2 and after[0] in "-_/" and after[1].isalnum())
    return glued_before or glued_after


# spaces people write between digit groups or around "@": ASCII space and tab, NBSP, the Unicode fixed-width,
# thin and narrow spaces and the ideographic space (not line breaks: text split over lines is not matched)
_SPACE = "[ \\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]"

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])"
    r"[A-Za-z0-9_%+\-](?:[A-Za-z0-9._%+\-]{0,62}[A-Za-z0-9_%+\-])?"
    rf"{_SPACE}{{0,3}}@{_SPACE}{{0,3}}"  # "name @ domain.com", as written to slip past filters
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
    r"(?![A-Za-z0-9\-]|\.[A-Za-z0-9])"
)


def _emails(text: str) -> list[Match]:
    return [Match("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]


# runs of digit groups joined by separators (spaces of any kind and number, or one dash, dot or slash with
# spaces around it or not), not inside a word
_CARD_SEPARATOR = rf"(?:{_SPACE}+[\-./]?{_SPACE}*|[\-./]{_SPACE}*)"
_DIGIT_RUN = re.compile(rf"(?<![A-Za-z0-9_])[0-9]+(?:{_CARD_SEPARATOR}[0-9]+)*(?![A-Za-z0-9_])")
_GROUP = re.compile(r"[0-9]+")


def _separator_kind(gap: str) -> str:
    """What joins two digit groups, as one kind: its punctuation (`-`, `.`, `/`), or a space however written."""
    mark = gap.strip(" \t\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f"
                     "\u205f\u3000")
    return mark or " "


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn(digits)


def _cards(text: str) -> list[Match]:
    found = []
    for run in _DIGIT_RUN.finditer(text):
        groups = list(_GROUP.finditer(run.group()))
        base = run.start()
        for i, first in enumerate(groups):
            if len(first.group()) >= 13:  # an unbroken run stands alone
                if _is_card(first.group()):
                    found.append(Match("card", base + first.start(), base + first.end()))
                continue
            if len(first.group()) != 4:
                continue
            digits, sep = first.group(), None
            for j in range(i + 1, len(groups)):
                g, gap = groups[j], _separator_kind(run.group()[groups[j - 1].end() : groups[j].start()])
                if not 3 <= len(g.group()) <= 6 or (sep is not None and gap != sep):
                    break
                sep, digits = gap, digits + g.group()
                if len(digits) > 19:
                    break
                if _is_card(digits):
                    found.append(Match("card", base + first.start(), base + g.end()))
    return found


# SWIFT IBAN registry: country -> total length
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{2})[0-9]{2}")


def _mod97(iban: str) -> bool:
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ibans(text: str) -> list[Match]:
    found = []
    for start in _IBAN_START.finditer(text):
        length = _IBAN_LENGTHS.get(start.group(1).upper())
        if length is None:
            continue
        chars, pos = [start.group()], start.end()
        need = length - 4
        while need and pos < len(text):
            if text[pos] == " " and pos + 1 < len(text) and text[pos + 1].isascii() and text[pos + 1].isalnum():
                pos += 1
            c = text[pos]
            if not (c.isascii() and c.isalnum()):
                break
            chars.append(c)
            need -= 1
            pos += 1
        if need or (pos < len(text) and text[pos].isascii() and text[pos].isalnum()):
            continue
        iban = "".join(chars).upper()
        if _mod97(iban):
            found.append(Match("iban", start.start(), pos))
    return found


_IPV4 = re.compile(r"(?<![A-Za-z0-9_.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![A-Za-z0-9_]|\.[0-9])")
_IPV6 = re.compile(
    r"(?<![A-Za-z0-9_:.])"
    r"(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)"  # at least two colons
    r"[0-9A-Fa-f:]+(?:(?<=:)[0-9]{1,3}(?:\.[0-9]{1,3}){3})?"
    r"(?![A-Za-z0-9_:]|\.[0-9])"
)


def _ips(text: str) -> list[Match]:
    found = []
    for m in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        found.append(Match("ip", m.start(), m.end()))
    for m in _IPV6.finditer(text):
        if not any(c.isdigit() for c in m.group()):  # "bad::face", "dead:beef::" read as words
            continue
        try:
            ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        found.append(Match("ip", m.start(), m.end()))
    return found


_SSN = re.compile(r"(?<![A-Za-z0-9_])(?<![0-9][ \-])([0-9]{3})([ \-])([0-9]{2})\2([0-9]{4})(?![A-Za-z0-9_]|[ \-][0-9])")


def _ssns(text: str) -> list[Match]:
    found = []
    for m in _SSN.finditer(text):
        area, group, serial = m.group(1), m.group(3), m.group(4)
        if area == "000" or area == "666" or area[0] == "9" or group == "00" or serial == "0000":
            continue
        found.append(Match("us_ssn", m.start(), m.end()))
    return found


_NINO = re.compile(
    r"(?<![A-Za-z0-9])"
    r"(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D]"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)


def _ninos(text: str) -> list[Match]:
    return [Match("uk_nino", m.start(), m.end()) for m in _NINO.finditer(text)]


_DE_IDNR = re.compile(
    r"(?<![A-Za-z0-9_])(?<![0-9][ /\-])"
    r"[1-9](?:[0-9]{10}|[0-9] [0-9]{3} [0-9]{3} [0-9]{3})"
    r"(?![A-Za-z0-9_]|[ /\-][0-9])"
)


def _de_idnr_valid(digits: str) -> bool:
    counts = Counter(digits[:10])
    repeated = [d for d, n in counts.items() if n > 1]
    if len(repeated) != 1 or counts[repeated[0]] > 3:
        return False
    product = 10
    for c in digits[:10]:
        total = (int(c) + product) % 10 or 10
        product = total * 2 % 11
    check = 11 - product
    return (0 if check == 10 else check) == int(digits[10])


def _de_tax_ids(text: str) -> list[Match]:
    found = []
    for m in _DE_IDNR.finditer(text):
        if _de_idnr_valid(m.group().replace(" ", "")):
            found.append(Match("de_tax_id", m.start(), m.end()))
    return found


_DETECTORS = {
    "email": _emails,
    "card": _cards,
    "iban": _ibans,
    "ip": _ips,
    "us_ssn": _ssns,
    "uk_nino": _ninos,
    "de_tax_id": _de_tax_ids,
}
