"""A model's tokenizer and a language: how well it covers the language's text
(:mod:`engine.models.tokenizer.coverage`, the warning of ``engine validate`` and ``engine
coverage``), and adding tokens learned on that text (:mod:`engine.models.tokenizer.extend`,
``engine extend-tokenizer``). It reads recipes and data, so it sits above the rest of
:mod:`engine.models`, beside training and evaluation (docs/architecture.md)."""

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

__all__ = ["THRESHOLDS", "Coverage", "Extended", "coverage_warnings", "extend_tokenizer",
           "load_backend", "measure", "measure_file", "poor_coverage"]
