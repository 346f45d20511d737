"""A task type is one module implementing `TaskType`; nothing outside pipeline/tasks/ branches on the task type."""

from __future__ import annotations

import inspect
import re

import pytest

from pipeline import tasks
from pipeline.recipe.schema import TaskSection
from tests.conftest import ROOT

PROTOCOL_MEMBERS = sorted(
    name for name in {*tasks.TaskType.__annotations__, *vars(tasks.TaskType)}
    if not name.startswith("_") and name not in {"mro"}
)


def test_the_protocol_has_the_members_the_guide_relies_on():
    assert {"inference", "parse_answer", "metrics", "gate_metric", "stratum", "answer_confidence",
            "report_lines"} <= set(PROTOCOL_MEMBERS)


@pytest.mark.parametrize("task_type", sorted(tasks.TASK_TYPES))
def test_each_task_module_implements_every_protocol_member_with_its_arity(task_type):
    module = tasks.for_type(task_type)
    assert isinstance(module, tasks.TaskType)
    for name in PROTOCOL_MEMBERS:
        assert hasattr(module, name), f"pipeline/tasks: `{task_type}` lacks `{name}`"
        declared = getattr(tasks.TaskType, name, None)
        if callable(declared):
            wanted = [p for p in inspect.signature(declared).parameters if p != "self"]
            given = list(inspect.signature(getattr(module, name)).parameters)
            assert len(given) == len(wanted), f"`{task_type}.{name}` takes {given}; the protocol passes {wanted}"
    assert module.inference in ("label_scoring", "constrained_json", "generation")
    for metric in module.gate_metrics:
        assert module.gate_metric(metric).name == metric
    with pytest.raises(ValueError, match="not a gate metric"):
        module.gate_metric("no_such_metric")


def test_the_recipe_enum_is_the_registered_task_types():
    from typing import get_args

    assert set(get_args(TaskSection.model_fields["type"].annotation)) == set(tasks.TASK_TYPES)


# `task.type == "x"`, `task.type in (...)`, `{...}[task.type]`, `match ...task.type`, and the same on a
# `task_type` variable: a branch on the type. Comparing two recipes' types for equality is not one.
BRANCH = re.compile(r"""task[._]type\s*(?:[!=]=\s*["']|(?:not\s+)?in\s)|["']\s*[!=]=\s*\S*task[._]type"""
                    r"""|[\w\]}]\s*\[\s*[\w.]*task[._]type\s*\]|match\s+\S*task[._]type""")


def test_nothing_outside_pipeline_tasks_branches_on_the_task_type():
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.is_relative_to(ROOT / "pipeline" / "tasks"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "call the task's protocol (pipeline/tasks) instead:\n" + "\n".join(found)


def test_the_branch_check_sees_the_forms_it_forbids():
    for line in ['if recipe.task.type == "classification":', 'x = 1 if task_type != "extraction" else 2',
                 'if recipe.task.type in ("a", "b"):', 'allowed = by_task[self.task.type]',
                 'return {"a": 1}[recipe.task.type]', 'match recipe.task.type:']:
        assert BRANCH.search(line), line
    for line in ['if other.task.type != ctx.recipe.task.type:', 'task = tasks.for_type(recipe.task.type)',
                 'print(f"a {recipe.task.type} recipe")']:
        assert not BRANCH.search(line), line


def test_the_guide_explains_every_protocol_member_and_names_each_place_a_task_type_touches():
    guide = (ROOT / "docs/guides/adding-a-task-type.md").read_text()
    missing = [name for name in PROTOCOL_MEMBERS if not re.search(rf"^- `{name}[`(]", guide, re.MULTILINE)]
    assert not missing, f"docs/guides/adding-a-task-type.md does not explain: {missing}"
    for place in ("pipeline/tasks/__init__.py", "pipeline/recipe/schema.py", "pipeline/tasks/multilabel.py",
                  "recipes/ticket-tagging.yaml", "tests/smoke/test_multilabel_pipeline.py", "tests/unit/test_multilabel.py"):
        assert place in guide and (ROOT / place).exists(), place
