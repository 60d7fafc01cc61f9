"""A model's tokenizer and a language: how well it covers the language's text
(:mod:`engine.models.tokenizer.coverage`, the warning of ``engine validate`` and ``engine
coverage``), adding tokens learned on that text (:mod:`engine.models.tokenizer.extend`,
``engine extend-tokenizer``), giving a model another tokenizer
(:mod:`engine.models.tokenizer.transplant`, ``engine transplant-tokenizer``) and the init
methods that make the rows of new tokens (:mod:`engine.models.tokenizer.inits`, plugins of
the hook ``register_embedding_inits``). It reads recipes and data, so it sits above the rest
of :mod:`engine.models`, beside training and evaluation (docs/architecture.md)."""

from engine.models.tokenizer.coverage import (
    THRESHOLDS,
    Coverage,
    coverage_warnings,
    load_backend,
    measure,
    measure_file,
    poor_coverage,
)
from engine.models.tokenizer.extend import Extended, extend_tokenizer
from engine.models.tokenizer.inits import (
    InitProblem,
    InitRows,
    NewToken,
    get_init,
    init_methods,
    initialise,
)
from engine.models.tokenizer.transplant import Changed, change_vocabulary, transplant_tokenizer

__all__ = ["THRESHOLDS", "Changed", "Coverage", "Extended", "InitProblem", "InitRows", "NewToken",
           "change_vocabulary", "coverage_warnings", "extend_tokenizer", "get_init", "init_methods",
           "initialise", "load_backend", "measure", "measure_file", "poor_coverage",
           "transplant_tokenizer"]
