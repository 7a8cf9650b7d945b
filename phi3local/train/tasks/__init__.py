"""What a recipe's `task` trains: one module per task, each owning its batches, loss, metrics and evaluation.

`phi3local.train.recipe` runs the loop (plans, steps, checkpoints, logging) and calls the task through the
small protocol in `phi3local.train.tasks.base.Task`; it never asks which task it runs.

| task | module | documents | loss averaged over |
|---|---|---|---|
| causal_lm | `causal_lm.py` | token lists with a label mask | trained tokens |
| classification | `classification.py` | token lists with a class label | examples |
| preference | `preference.py` | prompt + chosen + rejected answers | pairs |
"""

from __future__ import annotations

from phi3local.train.tasks.base import Documents, Task


def task_for(name_or_recipe) -> Task:
    """The task object of a recipe (or of a task name: its settings are then the defaults). A task keeps no
    state between calls; it reads its settings from the recipe once."""
    recipe = None if isinstance(name_or_recipe, str) else name_or_recipe
    name = name_or_recipe if recipe is None else recipe.task
    if name == "classification":
        from phi3local.train.tasks.classification import Classification

        return Classification(recipe)
    if name == "preference":
        from phi3local.train.tasks.preference import Preference

        return Preference(recipe)
    from phi3local.train.tasks.causal_lm import CausalLM

    return CausalLM(recipe)


__all__ = ["Documents", "Task", "task_for"]
