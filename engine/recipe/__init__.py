"""The recipe: its model (:mod:`engine.recipe.spec`, the YAML file a user writes, checked
by pydantic) and its ``runtime:`` section (:mod:`engine.recipe.runtime`), and what
validation makes of it.

Validation sits a layer higher than the recipe model (it asks the plugins, reads model
configs and estimates memory) and this package's ``__init__`` does not import it:

* :mod:`engine.recipe.validate` -- ``engine validate``: a recipe into a :class:`~engine.recipe.plan.Plan`;
* :mod:`engine.recipe.plan` -- the plan a run executes;
* :mod:`engine.recipe.model_checks` -- the checks that read input models' configs;
* :mod:`engine.recipe.estimate` -- peak-memory estimates;
* :mod:`engine.recipe.schema` -- the recipe JSON schema and reference.
"""

from engine.recipe.runtime import RuntimeSpec
from engine.recipe.spec import (
    INPUT_RULES,
    DataSpec,
    ModelSpec,
    Recipe,
    StageSpec,
    apply_overrides,
    format_validation_error,
    load_recipe,
    parse_recipe,
    read_recipe_data,
    resolve_model_path,
)

__all__ = ["INPUT_RULES", "DataSpec", "ModelSpec", "Recipe", "RuntimeSpec", "StageSpec",
           "apply_overrides", "format_validation_error", "load_recipe", "parse_recipe",
           "read_recipe_data", "resolve_model_path"]
