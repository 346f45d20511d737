"""The docs a newcomer reads: a README that stays short, links that lead somewhere, and a recipe that is valid."""

import re
from pathlib import Path

import pytest

from pipeline.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text(encoding="utf-8")), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_stays_within_25_kb():
    size = README.stat().st_size
    assert size <= 25_000, f"README.md is {size:,} bytes; move detail into docs/ and link it"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_a_file_and_heading(doc: Path):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading in {path.name})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_the_readme_recipe_is_valid(tmp_path):
    """The recipe on page one is one a newcomer can copy: it validates, and its data is there from recipes/."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^## A recipe$.*?^```yaml\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert block, "README.md lost its recipe (## A recipe, a ```yaml block)"
    path = tmp_path / "recipe.yaml"
    path.write_text(block.group(1), encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.task.type == "classification" and recipe.registry.model_name == "ticket-router"
    source = re.search(r"source: (\S+)", block.group(1)).group(1)
    assert (ROOT / "recipes" / source).is_file(), f"its data.source {source} is not there from recipes/"
