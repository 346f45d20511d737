"""What each task type means: prompt, target text, answer parsing, metrics.

Stages ask `for_type(recipe.task.type)` for the module and call the same
functions on either, so prep, train and eval stay task-agnostic.
"""

from types import ModuleType

from pipeline.tasks import classification, extraction, generation


def for_type(task_type: str) -> ModuleType:
    return {"classification": classification, "extraction": extraction, "generation": generation}[task_type]
