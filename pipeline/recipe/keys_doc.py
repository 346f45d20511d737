"""The recipe's keys, documented once: generated from the field descriptions of the pydantic model in recipe.py.

One row per dotted key (`data.split.seed`; `[]` stands for each item of a list: `eval.baselines[].model`) with
its type, its default (or `required`) and its description. From these rows come the key table of
docs/RECIPE_KEYS.md (between the markers below), `expert validate RECIPE --keys` and
`expert validate RECIPE --explain KEY`.

    python -m pipeline.recipe.keys_doc --write    # regenerate docs/RECIPE_KEYS.md after changing a field
    python -m pipeline.recipe.keys_doc --check    # exit 1 when it is stale (tests/unit/test_recipe_docs.py)
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.errors import UserError
from pipeline.recipe.schema import BASELINE_KINDS, Recipe

KEYS_DOC = Path(__file__).resolve().parents[2] / "docs" / "RECIPE_KEYS.md"
START = "<!-- recipe-keys:start -->"
END = "<!-- recipe-keys:end -->"
NOTE = ("<!-- generated from the field descriptions in pipeline/recipe/schema.py: "
        "python -m pipeline.recipe.keys_doc --write -->")


@dataclass(frozen=True)
class Key:
    key: str  # dotted YAML path
    type: str
    default: str  # "required", "required with `eval.cascade`", "none", "13", ...
    description: str
    kinds: tuple[str, ...] = ()  # the baseline kinds that take it, when not every kind does
    section: bool = False  # a mapping or list of mappings, with keys below it
    listed: bool = True  # a row of the table (sections that are always there are not)

    @property
    def meaning(self) -> str:
        """The description, saying which baseline kinds the key applies to."""
        if not self.kinds:
            return self.description
        which = f"{self.kinds[0]} only" if len(self.kinds) == 1 else " and ".join(self.kinds)
        return f"{which}: {self.description}"


# -- the rows ----------------------------------------------------------------------------------------------------


@cache
def all_keys() -> tuple[Key, ...]:
    """Every key a recipe can have, in the model's order, sections before the keys below them."""
    return tuple(_walk(Recipe.model_fields, "", None, ()))


def keys() -> tuple[Key, ...]:
    """The table's rows: leaf keys, and optional mappings and lists (`eval.cascade`, `eval.baselines`); not the
    sections every recipe has (`task`, `data.split`)."""
    return tuple(k for k in all_keys() if k.listed)


def sections() -> dict[str, Key]:
    """Every key that holds a mapping or a list of mappings."""
    return {k.key: k for k in all_keys() if k.section}


def _walk(fields: dict[str, FieldInfo], prefix: str, within: str | None, kinds: tuple[str, ...]):
    for name, info in fields.items():
        key = prefix + (info.alias or name)
        models = _models_in(info.annotation)
        if not models:
            yield Key(key, _type_text(info.annotation, info.metadata), _default_text(info, within),
                      info.description or "", kinds)
            continue
        is_list = get_origin(info.annotation) is list
        optional = is_list or (not info.is_required() and info.get_default(call_default_factory=True) is None)
        default = _default_text(info, within) if optional else "each key's own"
        yield Key(key, "list of mappings" if is_list else "mapping", default, info.description or "", kinds,
                  section=True, listed=optional)
        # a required key below an optional mapping is required when the mapping is given; in a list, in every item
        below, inner_within = (f"{key}[]." if is_list else f"{key}."), (key if optional and not is_list else within)
        if len(models) == 1:
            yield from _walk(models[0].model_fields, below, inner_within, kinds)
        else:
            yield from _walk_union(models, below, inner_within)


def _walk_union(models: list[type[BaseModel]], prefix: str, within: str | None):
    """The members of a discriminated union (the baseline kinds) as one set of keys, each saying which kinds take
    it unless all do."""
    tags = {cls: tag for tag, cls in BASELINE_KINDS.items()}
    members = [cls for cls in models if cls in tags]
    by_name: dict[str, list[type[BaseModel]]] = {}
    for cls in members:
        for name in cls.model_fields:
            by_name.setdefault(name, []).append(cls)
    for name, having in by_name.items():
        kinds = () if len(having) == len(members) else tuple(tags[cls] for cls in having)
        info = having[0].model_fields[name]
        if name == "kind":
            yield Key(prefix + name, " | ".join(f"`{tags[cls]}`" for cls in having), "required",
                      info.description or "")
        else:
            yield from _walk({name: info}, prefix, within, kinds)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field holds: itself, `Model | None`, `list[Model]` or a union of models."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _models_in(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    if origin is list:
        return _models_in(get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _constraints(metadata) -> list[Any]:
    out = []
    for m in metadata:
        out += _constraints(m.metadata) if isinstance(m, FieldInfo) else [m]
    return out


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        if value >= 2**16 and value & (value - 1) == 0:
            return f"2^{value.bit_length() - 1}"
        if value >= 10**6 and str(value).rstrip("0") == "1":
            return f"10^{len(str(value)) - 1}"
        return f"{value:,}" if value >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _bounds(metadata) -> str:
    words = []
    for c in _constraints(metadata):
        for cls, attr, sign in ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
                                (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<=")):
            if isinstance(c, cls):
                words.append(f"{sign} {_number(getattr(c, attr))}")
        if isinstance(c, annotated_types.MinLen) and c.min_length > 0:
            words.append("non-empty")
    return f" ({', '.join(words)})" if words else ""


def _type_text(annotation: Any, metadata=()) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *inner = get_args(annotation)
        return _type_text(base, [*inner, *metadata])
    if origin in (Union, UnionType):
        parts = [_type_text(arg) for arg in get_args(annotation) if arg is not NoneType]
        return " | ".join(parts) + _bounds(metadata)
    if origin is Literal:
        return " | ".join(f"`{v}`" for v in get_args(annotation))
    if origin is list:
        return f"list of {_type_text(get_args(annotation)[0])}" + _bounds(metadata)
    if origin is dict:
        value = get_args(annotation)[1]
        return ("mapping" if value is Any else f"mapping of {_type_text(value)}") + _bounds(metadata)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    name = {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return name + ("" if name == "str" else _bounds(metadata))


def _default_text(info: FieldInfo, within: str | None) -> str:
    shown = (info.json_schema_extra or {}).get("shown_default") if isinstance(info.json_schema_extra, dict) else None
    if shown:
        return str(shown)
    if info.is_required():
        return f"required with `{within}`" if within else "required"
    return value_text(info.get_default(call_default_factory=True))


def value_text(value: Any) -> str:
    """A recipe value as a recipe would spell it (flow-style YAML)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return f"`{value}`"
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()


def kinds_text() -> list[tuple[str, str]]:
    """Each baseline kind with its class docstring: what that kind of baseline is."""
    return [(tag, " ".join(inspect.cleandoc(cls.__doc__ or "").split())) for tag, cls in BASELINE_KINDS.items()]


# -- the generated table -----------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def markdown() -> str:
    """The block between the markers: the key table, then what each baseline kind is."""
    lines = [NOTE, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k.key}` | {_cell(k.type)} | {_cell(k.default)} | {_cell(k.meaning)} |" for k in keys()]
    lines += ["", "A baseline's `kind` decides which `eval.baselines[]` keys apply to it (a key of another kind is "
              "an error):", ""]
    for tag, text in kinds_text():
        lines += textwrap.wrap(f"`{tag}`: {text}", width=78, initial_indent="- ", subsequent_indent="  ",
                               break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the markers replaced by `block`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise UserError(f"the recipe key table's markers ({START} ... {END}) are missing")
    return text[: start + len(START)] + "\n" + block + "\n" + text[end:]


def current_block(text: str) -> str | None:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(START) : end].strip("\n")


# -- one key, for `expert validate --explain` --------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    key: str  # as the table spells it
    index: int | None  # the list item asked for: eval.baselines[1].model
    row: Key


def _list_keys() -> set[str]:
    return {k.key for k in sections().values() if k.type == "list of mappings"}


def lookup(asked: str) -> Found:
    """A key as a user may write it (`eval.baselines.model`, `eval.baselines[1].model`, `eval.baselines.1.model`)
    found in the table; an unknown key is a UserError naming the closest valid keys."""
    text = re.sub(r"\[(\d*)\]", lambda m: f".{m.group(1)}" if m.group(1) else "", asked.strip())
    index, parts = None, []
    for part in text.split("."):
        if part.isdigit() and index is None and parts:
            index = int(part)
        else:
            parts.append(part)
    lists, key = _list_keys(), ""
    for i, part in enumerate(parts):
        key = f"{key}.{part}" if key else part
        if key in lists and i < len(parts) - 1:
            key += "[]"
    rows = {k.key: k for k in keys()} | sections()
    if key in rows:
        return Found(key, index, rows[key])
    raise UserError(f"unknown recipe key `{asked}`; {_suggest(key, list(rows))} "
                    "(every key: expert validate RECIPE --keys)")


def _suggest(key: str, candidates: list[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    same_name = [c for c in candidates if c.rsplit(".", 1)[-1] == last]
    close = difflib.get_close_matches(key, candidates, n=5, cutoff=0.6)
    by_part = difflib.get_close_matches(last, [c.rsplit(".", 1)[-1] for c in candidates], n=3, cutoff=0.7)
    near = [c for c in candidates if c.rsplit(".", 1)[-1] in by_part]
    picks = list(dict.fromkeys(same_name + close + near))[:5]
    return f"closest: {', '.join(picks)}" if picks else "no key is close"


def _value_at(node: Any, parts: list[str], prefix: str = "") -> str:
    for i, part in enumerate(parts):
        if node is None:
            return f"none (`{prefix}{'.'.join(parts[:i])}` is not set)"
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, (dict, list)) and node:
        return "\n" + textwrap.indent(yaml.safe_dump(node, sort_keys=False, allow_unicode=True).rstrip(), "      ")
    return value_text(node)


def _values(recipe: Recipe, found: Found) -> list[tuple[str, str]]:
    """(which, value) for the key in this recipe; a key of a list's items gives one pair per item."""
    dumped: Any = recipe.model_dump(mode="json", by_alias=True)
    head, _, rest = found.key.partition("[].")
    if not rest:
        parts = head.split(".")
        if found.index is None:
            return [("", _value_at(dumped, parts))]
        items = _follow(dumped, parts)
        if not isinstance(items, list) or found.index >= len(items):
            return [(f"[{found.index}]", "no such item")]
        return [(f"[{found.index}]", _value_at(items[found.index], []))]
    items = _follow(dumped, head.split(".")) or []
    picked = list(enumerate(items))
    if found.index is not None:
        picked = [(found.index, items[found.index] if found.index < len(items) else None)]
    out = []
    for i, item in picked:
        if item is None:
            out.append((f"[{i}]", "no such item"))
            continue
        label = f"[{i}] {item.get('name')} (kind: {item.get('kind')})"
        if found.row.kinds and item.get("kind") not in found.row.kinds:
            out.append((label, f"not a key of kind `{item.get('kind')}`"))
        else:
            out.append((label, _value_at(item, rest.split("."))))
    return out or [("", "none (no items)")]


def _follow(node: Any, parts: list[str]) -> Any:
    for part in parts:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def explain(found: Found, recipe: Recipe | None) -> str:
    """One key in plain text: its type, default, description and the recipe's value; a section with its keys."""
    row = found.row
    lines = [row.key if found.index is None else row.key.replace("[]", f"[{found.index}]", 1), ""]
    lines += [f"  type:     {row.type}", f"  default:  {row.default}"]
    if recipe is not None:
        values = _values(recipe, found)
        if len(values) == 1 and not values[0][0]:
            lines.append("  value:" + ("" if values[0][1].startswith("\n") else "    ") + values[0][1])
        else:
            lines.append("  value:")
            lines += [f"    {label}:" + ("" if value.startswith("\n") else " ") + value for label, value in values]
    lines += [""] + textwrap.wrap(row.meaning, width=100, initial_indent="  ", subsequent_indent="  ")
    if row.key.endswith(".kind") and "[]" in row.key:
        lines.append("")
        for tag, text in kinds_text():
            lines += textwrap.wrap(f"{tag}: {text}", width=100, initial_indent="  - ", subsequent_indent="    ")
    if row.section:
        below = [k for k in keys() if k.key.startswith(row.key + ".") or k.key.startswith(row.key + "[].")]
        width = max((len(k.key) for k in below), default=0)
        lines += ["", "  keys:"] + [f"    {k.key:<{width}}  {k.type}; default: {k.default}" for k in below]
    return "\n".join(lines)


def terminal_table(title: str | None = "Recipe keys"):
    """The key table for a terminal (rich), markup-free."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, box=box.SIMPLE_HEAD, expand=True)
    table.add_column("key", no_wrap=True, style="bold")
    table.add_column("type", max_width=26)
    table.add_column("default", max_width=22)
    table.add_column("meaning", ratio=1, min_width=30)
    for k in keys():
        table.add_row(Text(k.key), Text(k.type), Text(k.default), Text(k.meaning))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.recipe.keys_doc", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, nargs="?", const=KEYS_DOC, metavar="FILE",
                       help="rewrite the table between the markers (default: docs/RECIPE_KEYS.md)")
    group.add_argument("--check", type=Path, nargs="?", const=KEYS_DOC, metavar="FILE",
                       help="exit 1 when the table there is stale (default: docs/RECIPE_KEYS.md)")
    args = parser.parse_args(argv)
    if args.write is None and args.check is None:
        print(markdown())
        return 0
    path = args.write or args.check
    text = path.read_text(encoding="utf-8")
    if current_block(text) is None:
        print(f"{path}: the recipe key table's markers ({START} ... {END}) are missing", file=sys.stderr)
        return 1
    if args.check is not None:
        if current_block(text) != markdown():
            again = "" if path == KEYS_DOC else f" {path}"
            print(f"{path}: the recipe key table is stale; run python -m pipeline.recipe.keys_doc --write{again}",
                  file=sys.stderr)
            return 1
        return 0
    path.write_text(replace_block(text, markdown()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
