#!/usr/bin/env python3
"""Generate the two small sample datasets that ship with the project.

Why this exists
---------------
The demo recipes and the tests need realistic-looking, license-clean data
that anyone can rebuild without network access or a frontier-model API key.
This script writes it from hand-written templates and slot fillers
(``data/templates/*.yaml``) and a fixed random seed, using the Python
standard library and PyYAML:

* ``data/tickets/tickets.jsonl`` - customer-support messages for a fictional
  SaaS + e-commerce company, each labelled with one of five queues
  (classification task).
* ``data/orders/orders.jsonl`` - short customer messages about an order, each
  with a ``fields`` object to extract (structured-extraction task, validated
  against ``ORDER_SCHEMA``: ``task.schema`` of ``recipes/schema-extraction.yaml``,
  read from the recipe, not copied).

The text is synthetic: every message was produced by this script, no real
customer wrote it, and no real person, order or company is described.

How to re-run
-------------
From the repository root::

    .venv/bin/python scripts/make_sample_data.py            # writes data/tickets/ and data/orders/
    .venv/bin/python scripts/make_sample_data.py --out DIR  # the same files under DIR, to compare

The output is byte-identical on every run (fixed seed, sorted keys, one JSON
object per line, trailing newline).  Editing a template or a filler list
changes the data, so regenerate and commit the templates and the files together.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import yaml

SEED = 20240611

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
TICKETS_PATH = Path("tickets") / "tickets.jsonl"  # under DATA, or under --out
ORDERS_PATH = Path("orders") / "orders.jsonl"

# Rows per class. Tickets: 400 in total, orders: 300 in total.
QUEUE_COUNTS = {
    "billing": 82,
    "technical": 84,
    "account": 78,
    "shipping": 80,
    "returns": 76,
}
ISSUE_COUNTS = {
    "damaged": 64,
    "missing": 58,
    "late": 62,
    "wrong_item": 56,
    "other": 60,
}
ORDER_NULL_ID_FRACTION = 0.2
MAX_WORDS = 110

# What the generator is made of, as data: slot fillers and templates in data/templates/*.yaml, and the
# extraction target's JSON Schema from the recipe that uses the orders (one copy, the recipe's).
TEMPLATES = ROOT / "data" / "templates"
SCHEMA_RECIPE = ROOT / "recipes" / "schema-extraction.yaml"


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# Extraction target for data/orders/orders.jsonl (JSON Schema, draft 2020-12): `task.schema` of the recipe.
ORDER_SCHEMA = read_yaml(SCHEMA_RECIPE)["task"]["schema"]
ISSUES = ORDER_SCHEMA["properties"]["issue"]["enum"]

# --------------------------------------------------------------------------
# Slot fillers (data/templates/fillers.yaml)
# --------------------------------------------------------------------------

FILLERS = read_yaml(TEMPLATES / "fillers.yaml")
GADGETS = FILLERS["gadgets"]
FURNITURE = FILLERS["furniture"]
HOUSEWARES = FILLERS["housewares"]
SOFT_GOODS = FILLERS["soft_goods"]
APPAREL = FILLERS["apparel"]
PRODUCTS = GADGETS + FURNITURE + HOUSEWARES + SOFT_GOODS + APPAREL
HARD_GOODS = GADGETS + FURNITURE + HOUSEWARES
PRODUCT_POOLS = {
    "any": PRODUCTS,
    "hard": HARD_GOODS,
    "gadget": GADGETS,
    "assembly": FURNITURE + ["label printer", "air purifier"],
    "soft": SOFT_GOODS + APPAREL,
    "apparel": APPAREL,
}
FEATURES = FILLERS["features"]
REPORT_PAGES = FILLERS["report_pages"]
MONTHS = FILLERS["months"]
PLANS = FILLERS["plans"]
BROWSERS = FILLERS["browsers"]
DEVICES = FILLERS["devices"]
DATES = FILLERS["dates"]
DEADLINES = FILLERS["deadlines"]
AMOUNTS = FILLERS["amounts"]
CARRIERS = FILLERS["carriers"]
CITIES = FILLERS["cities"]
ERRORS = FILLERS["errors"]
FIRST_NAMES = FILLERS["first_names"]
SURNAMES = FILLERS["surnames"]
COLORS = FILLERS["colors"]
PARTS = FILLERS["parts"]
VARIANTS = FILLERS["variants"]
ORDER_LETTERS = FILLERS["order_letters"]
AGENTS = FILLERS["agents"]
NUMBER_WORDS = FILLERS["number_words"]

# --------------------------------------------------------------------------
# Ticket templates and tone (data/templates/tickets.yaml)
# --------------------------------------------------------------------------

TICKETS = read_yaml(TEMPLATES / "tickets.yaml")
TICKET_TEMPLATES = TICKETS["templates"]
OPENERS = TICKETS["openers"]
CLOSERS = TICKETS["closers"]
ANGRY_BEFORE = TICKETS["angry_before"]
ANGRY_AFTER = TICKETS["angry_after"]
RAMBLE_BEFORE = TICKETS["ramble_before"]
RAMBLE_AFTER = TICKETS["ramble_after"]
TICKET_TYPOS = TICKETS["typos"]

# --------------------------------------------------------------------------
# Order templates, (product pool, template) per issue (data/templates/orders.yaml)
# --------------------------------------------------------------------------

ORDERS = read_yaml(TEMPLATES / "orders.yaml")
ORDER_TEMPLATES = {issue: [(pool, text) for pool, text in pairs] for issue, pairs in ORDERS["templates"].items()}
ORDER_OPENERS = ORDERS["openers"]
ORDER_CLOSERS = ORDERS["closers"]
ORDER_EXTRAS = ORDERS["extras"]
NULL_ID_NOTES = ORDERS["null_id_notes"]
ID_SUFFIXES = ORDERS["id_suffixes"]
ID_PREFIXES = ORDERS["id_prefixes"]
ORDER_TYPOS = ORDERS["typos"]

ALT_RE = re.compile(r"\[([^\[\]]*)\]")
ORDER_ID_RE = re.compile(r"[A-Z][0-9]{5}")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


class DataError(ValueError):
    """A generated row breaks one of the dataset's guarantees."""


def require(condition: object, detail: object = "") -> None:
    """Like ``assert`` but also active under ``python -O``."""
    if not condition:
        raise DataError(str(detail))


def expand_alternatives(rng: random.Random, template: str) -> str:
    """Replace every "[a|b|c]" with one alternative (an empty one is allowed)."""
    text = ALT_RE.sub(lambda m: rng.choice(m.group(1).split("|")), template)
    return re.sub(r" {2,}", " ", text).strip()


def with_article(noun: str) -> str:
    vowel_sound = noun[0].lower() in "aeiou" and not noun.startswith(("USB", "us", "un"))
    article = "an" if vowel_sound else "a"
    return f"{article} {noun}"


def cap_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def word_count(text: str) -> int:
    return len(text.split())


def make_email(rng: random.Random) -> str:
    name = rng.choice(FIRST_NAMES).lower()
    name = name.replace("í", "i")
    sep = rng.choice([".", "_", ""])
    domain = rng.choice(["example.com", "example.org", "example.net"])
    return f"{name}{sep}{rng.choice(SURNAMES)}@{domain}"


def make_order_id(rng: random.Random) -> str:
    return rng.choice(ORDER_LETTERS) + f"{rng.randrange(10000, 100000)}"


def apply_typo(rng: random.Random, text: str, table: dict[str, str]) -> str:
    """Introduce one realistic typo: a known misspelling or two swapped letters."""
    candidates = [w for w in table if re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)]
    if candidates and rng.random() < 0.75:
        word = rng.choice(candidates)
        pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)

        def repl(m: re.Match[str]) -> str:
            bad = table[word]
            return cap_first(bad) if m.group(0)[0].isupper() else bad

        return pattern.sub(repl, text, count=1)
    words = [m for m in re.finditer(r"\b[a-z]{5,}\b", text)]
    if not words:
        return text
    m = rng.choice(words)
    w = m.group(0)
    i = rng.randrange(1, len(w) - 2)
    w2 = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return text[: m.start()] + w2 + text[m.end():]


def common_slots(rng: random.Random) -> dict[str, str]:
    amount, amount2 = rng.sample(AMOUNTS, 2)
    product, product2 = rng.sample(PRODUCTS, 2)
    return {
        "product_a": with_article(product),
        "gadget": rng.choice(GADGETS),
        "hard": rng.choice(HARD_GOODS),
        "apparel": rng.choice(APPAREL),
        "report": rng.choice(REPORT_PAGES),
        "month": rng.choice(MONTHS),
        "agent": rng.choice(AGENTS),
        "amount": amount,
        "amount2": amount2,
        "plan": rng.choice(PLANS),
        "product": product,
        "product2": product2,
        "feature": rng.choice(FEATURES),
        "browser": rng.choice(BROWSERS),
        "device": rng.choice(DEVICES),
        "date": rng.choice(DATES),
        "deadline": rng.choice(DEADLINES),
        "last4": f"{rng.randrange(0, 10000):04d}",
        "carrier": rng.choice(CARRIERS),
        "days": str(rng.choice([3, 4, 5, 6, 8, 9, 10, 12, 14, 16, 21])),
        "days_late": str(rng.choice([9, 10, 11, 12, 14, 16, 18, 21, 25])),
        "email": make_email(rng),
        "error": rng.choice(ERRORS),
        "city": rng.choice(CITIES),
        "n": str(rng.randrange(2, 13)),
        "seats": str(rng.choice([5, 8, 10, 12, 15, 20, 25, 40])),
        "order": "#" + make_order_id(rng),
        "part": rng.choice(PARTS),
        "name": rng.choice(FIRST_NAMES),
    }


# --------------------------------------------------------------------------
# Tickets
# --------------------------------------------------------------------------


def render_ticket(rng: random.Random, template: str) -> str:
    slots = common_slots(rng)
    core = expand_alternatives(rng, template).format_map(slots)
    style = rng.random()
    parts: list[str] = []
    if style < 0.12:  # terse: no greeting, lower case, no final period
        text = core.lower().rstrip(".")
        if rng.random() < 0.3:
            text += rng.choice(["", " thx", " pls help", "??"])
        text = text.strip()
    else:
        if style < 0.24:  # angry
            if rng.random() < 0.4:
                parts.append(rng.choice(ANGRY_BEFORE))
            parts.append(core)
            if len(parts) == 1 or rng.random() < 0.4:
                parts.append(rng.choice(ANGRY_AFTER))
        elif style < 0.40:  # rambling
            if rng.random() < 0.7:
                parts.append(rng.choice(RAMBLE_BEFORE))
            parts.append(core)
            if len(parts) == 1 or rng.random() < 0.5:
                parts.append(rng.choice(RAMBLE_AFTER))
        else:
            parts.append(core)
        text = " ".join(parts)
        # Greetings and sign-offs, sometimes on their own line as in an email.
        if rng.random() < 0.35:
            text = rng.choice(OPENERS).format_map(slots) + rng.choice([" ", " ", "\n"]) + text
        if rng.random() < 0.4:
            text = text + rng.choice([" ", " ", "\n"]) + rng.choice(CLOSERS).format_map(slots)
        if rng.random() < 0.06:
            text = text.rstrip(".")
    if rng.random() < 0.15:
        text = apply_typo(rng, text, TICKET_TYPOS)
    return text


def make_tickets(rng: random.Random) -> list[dict]:
    require(set(TICKET_TEMPLATES) == set(QUEUE_COUNTS), "queues differ between QUEUE_COUNTS and tickets.yaml")
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for queue, count in QUEUE_COUNTS.items():
        templates = TICKET_TEMPLATES[queue]
        require(len(templates) >= 25, (queue, len(templates)))
        require(len(set(templates)) == len(templates), queue)
        order = list(templates)
        made = 0
        i = 0
        attempts = 0
        while made < count:
            if i % len(order) == 0:
                rng.shuffle(order)
            template = order[i % len(order)]
            i += 1
            attempts += 1
            require(attempts < count * 20, f"cannot make enough unique tickets for {queue}")
            text = render_ticket(rng, template)
            if text in seen:
                i -= 1  # retry the same template with new slots
                continue
            require(word_count(text) <= MAX_WORDS, text)
            seen.add(text)
            rows.append((queue, text))
            made += 1
    rng.shuffle(rows)
    out = []
    for idx, (queue, text) in enumerate(rows, start=1):
        out.append({"id": f"t{idx:04d}", "text": text, "queue": queue})
    return out


# --------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------


def pick_quantity(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.55:
        return 1
    if r < 0.77:
        return 2
    if r < 0.88:
        return 3
    return rng.choice([4, 5, 6, 10, 12])


def item_phrase(rng: random.Random, product: str, qty: int) -> tuple[str, bool, str]:
    """Noun phrase naming the product and quantity.

    Returns (phrase, plural, trailing sentence stating the quantity or "").
    """
    word = NUMBER_WORDS[qty]
    if qty == 1:
        r = rng.random()
        if r < 0.75:
            return rng.choice(["the", "my", "the", "my"]) + f" {product}", False, ""
        if r < 0.9:
            return rng.choice([f"one {product}", f"1 x {product}", f"a single {product}"]), False, ""
        return f"the {product}", False, rng.choice(["Qty 1.", "Quantity: 1.", "Just one unit."])
    r = rng.random()
    if r < 0.7:
        phrase = rng.choice([
            f"{qty} x {product}", f"{qty}x {product}", f"{qty} units of the {product}",
            f"{word} units of the {product}",
        ] + ([f"all {word} units of the {product}"] if qty >= 3 else []))
        return phrase, True, ""
    trailing = rng.choice([
        f"I ordered {word} of these.", f"Quantity: {qty}.", f"(I bought {qty}.)",
        f"There were {word} in the order.", f"Qty {qty}.",
    ])
    return f"the {product}", False, trailing


def end_sentence(text: str) -> str:
    return text if text[-1:] in ".!?)" else text + "."


def render_order(
    rng: random.Random, pool: str, template: str, issue: str, has_id: bool
) -> tuple[str, dict]:
    slots = common_slots(rng)
    product = rng.choice(PRODUCT_POOLS[pool])
    other = rng.choice([p for p in PRODUCTS if p != product and p not in product and product not in p])
    qty = pick_quantity(rng)
    item, plural, trailing = item_phrase(rng, product, qty)
    oid = make_order_id(rng) if has_id else None
    if oid is not None:
        ord_phrase = rng.choice([
            f"order #{oid}", f"order {oid}", f"order no. {oid}", f"order number {oid}", f"order ({oid})",
        ])
    else:
        ord_phrase = "order"
    color, color2 = rng.sample(COLORS, 2)
    slots.update({
        "item": item,
        "Item": cap_first(item),
        "ORD": ord_phrase,
        "was": "were" if plural else "was",
        "is": "are" if plural else "is",
        "has": "have" if plural else "has",
        "it": "they" if plural else "it",
        "them": "them" if plural else "it",
        "other_a": with_article(other),
        "color": color,
        "color2": color2,
        "variant": rng.choice(VARIANTS),
        "price": slots["amount"],
    })
    core = cap_first(expand_alternatives(rng, template).format_map(slots))
    parts: list[str] = []
    if oid is not None and "{ORD}" not in template:
        where = rng.random()
        if where < 0.45:
            core = rng.choice(ID_PREFIXES).format(oid=oid) + core
        else:
            core = end_sentence(core) + " " + rng.choice(ID_SUFFIXES).format(oid=oid)
    if rng.random() < 0.3:
        parts.append(rng.choice(ORDER_OPENERS))
    parts.append(core)
    if trailing:
        parts[-1] = end_sentence(parts[-1])
        parts.append(trailing)
    if oid is None and rng.random() < 0.35:
        parts[-1] = end_sentence(parts[-1])
        parts.append(rng.choice(NULL_ID_NOTES).format_map(slots))
    if rng.random() < 0.12:
        parts[-1] = end_sentence(parts[-1])
        parts.append(rng.choice(ORDER_EXTRAS))
    if rng.random() < 0.3:
        parts[-1] = end_sentence(parts[-1])
        parts.append(rng.choice(ORDER_CLOSERS).format_map(slots))
    text = " ".join(parts)
    if rng.random() < 0.12:
        typo = apply_typo(rng, text, ORDER_TYPOS)
        if product in typo and (oid is None or oid in typo) and _qty_text_intact(text, typo, qty):
            text = typo
    fields = {"order_id": oid, "product": product, "quantity": qty, "issue": issue}
    return text, fields


def _qty_text_intact(before: str, after: str, qty: int) -> bool:
    """A typo must not touch the words that state the quantity."""
    for token in (str(qty), NUMBER_WORDS[qty]):
        if before.count(token) != after.count(token):
            return False
    return True


def validate_fields(fields: object) -> None:
    """Hand-written check of ``fields`` against ORDER_SCHEMA (no dependencies)."""
    schema = ORDER_SCHEMA
    require(isinstance(fields, dict), fields)
    keys = set(fields)
    require(keys >= set(schema["required"]), f"missing keys: {set(schema['required']) - keys}")
    if schema["additionalProperties"] is False:
        require(keys <= set(schema["properties"]), f"extra keys: {keys - set(schema['properties'])}")
    oid = fields["order_id"]
    pattern = schema["properties"]["order_id"]["pattern"]
    require(oid is None or (isinstance(oid, str) and re.search(pattern, oid) is not None), oid)
    product = fields["product"]
    require(isinstance(product, str) and len(product) >= schema["properties"]["product"]["minLength"], product)
    qty = fields["quantity"]
    require(isinstance(qty, int) and not isinstance(qty, bool), qty)
    require(qty >= schema["properties"]["quantity"]["minimum"], qty)
    require(fields["issue"] in schema["properties"]["issue"]["enum"], fields["issue"])


def check_recoverable(text: str, fields: dict) -> None:
    """The extraction target must be readable off the text."""
    require(fields["product"] in text, (fields["product"], text))
    ids = ORDER_ID_RE.findall(text)
    if fields["order_id"] is None:
        require(not ids, text)
    else:
        require(ids == [fields["order_id"]], (ids, text))
    qty = fields["quantity"]
    if qty > 1:
        require(re.search(rf"(?<![0-9.$]){qty}(?![0-9])|\b{NUMBER_WORDS[qty]}\b", text, re.IGNORECASE), text)


def make_orders(rng: random.Random) -> list[dict]:
    require(set(ISSUES) == set(ISSUE_COUNTS) == set(ORDER_TEMPLATES),
            "issues differ between the recipe's schema, ISSUE_COUNTS and orders.yaml")
    total = sum(ISSUE_COUNTS.values())
    n_null = round(total * ORDER_NULL_ID_FRACTION)
    has_id_flags = [False] * n_null + [True] * (total - n_null)
    rng.shuffle(has_id_flags)
    all_templates = [t for ts in ORDER_TEMPLATES.values() for _, t in ts]
    require(len(all_templates) >= 20, len(all_templates))
    require(len(set(all_templates)) == len(all_templates), "duplicate order template")
    rows: list[tuple[str, dict]] = []
    seen: set[str] = set()
    flag_i = 0
    for issue in ISSUES:
        count = ISSUE_COUNTS[issue]
        templates = list(ORDER_TEMPLATES[issue])
        made = 0
        i = 0
        attempts = 0
        while made < count:
            if i % len(templates) == 0:
                rng.shuffle(templates)
            pool, template = templates[i % len(templates)]
            i += 1
            attempts += 1
            require(attempts < count * 20, f"cannot make enough unique orders for {issue}")
            text, fields = render_order(rng, pool, template, issue, has_id_flags[flag_i])
            if text in seen:
                i -= 1
                continue
            validate_fields(fields)
            check_recoverable(text, fields)
            require(word_count(text) <= MAX_WORDS, text)
            seen.add(text)
            rows.append((text, fields))
            made += 1
            flag_i += 1
    rng.shuffle(rows)
    return [
        {"id": f"o{idx:04d}", "text": text, "fields": fields}
        for idx, (text, fields) in enumerate(rows, start=1)
    ]


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


def optional_jsonschema_check(rows: list[dict]) -> str:
    """Cross-check with the jsonschema package when it happens to be installed."""
    try:
        import jsonschema  # type: ignore[import-not-found]
    except ImportError:
        return "jsonschema not installed; hand-written check only"
    validator = jsonschema.Draft202012Validator(ORDER_SCHEMA)
    jsonschema.Draft202012Validator.check_schema(ORDER_SCHEMA)
    for row in rows:
        validator.validate(row["fields"])
    return "jsonschema Draft202012Validator: all rows valid"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA, help="folder to write tickets/ and orders/ into (default: data/)")
    out = parser.parse_args().out.resolve()
    rng = random.Random(SEED)
    tickets = make_tickets(rng)
    orders = make_orders(rng)

    texts = [r["text"] for r in tickets]
    require(len(set(texts)) == len(texts), "duplicate ticket text")
    texts = [r["text"] for r in orders]
    require(len(set(texts)) == len(texts), "duplicate order text")

    write_jsonl(out / TICKETS_PATH, tickets)
    write_jsonl(out / ORDERS_PATH, orders)
    shown = Path("data") if out == DATA else out

    queues = Counter(r["queue"] for r in tickets)
    issues = Counter(r["fields"]["issue"] for r in orders)
    null_ids = sum(1 for r in orders if r["fields"]["order_id"] is None)
    print(f"wrote {shown / TICKETS_PATH}: {len(tickets)} rows")
    for q in QUEUE_COUNTS:
        print(f"  {q:<10} {queues[q]}")
    print(f"wrote {shown / ORDERS_PATH}: {len(orders)} rows "
          f"({null_ids} with order_id null)")
    for i in ISSUES:
        print(f"  {i:<10} {issues[i]}")
    print(optional_jsonschema_check(orders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
