"""Which models the merge conformance checks merge (``check_merge_method``'s ``family``
and ``models``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from engine.merging.counts import model_count, probe_count
from engine.testing._checks import Checker
from engine.testing.builders import family_names, shared_family

#: what ``models=`` may be: a count, names of the family's models, or {name: folder}
Models = int | Sequence[str] | Mapping[str, Path]


def choose_models(c: Checker, family: Mapping[str, Path] | None, models: Models | None,
                  wanted: int) -> tuple[Path, dict[str, Path]]:
    """The base folder and ``{name: folder}`` of the models ``check_merge_method`` merges:
    ``models`` as given (a count, names of the family's, or ``{name: folder}``), else the
    count nearest ``wanted`` that the method takes, drawn from ``family`` (default: the
    kit's shared family, built with as many models as needed). ValueError for a choice
    the method does not take or the family cannot give."""
    low, high = model_count(c.impl)
    who = f"{c.kind} plugin {c.name!r} (min_models={low}, max_models={high})"
    if isinstance(models, str) or (models is not None and not isinstance(models, int | Sequence | Mapping)):
        raise TypeError(f"models={models!r}: give a count, a list of the family's model names "
                        "or {name: folder}")
    if models is not None:
        count = models if isinstance(models, int) else len(models)
        if count < low or (high is not None and count > high):
            raise ValueError(f"models={models!r} gives {count} model(s) but {who} takes "
                             "other counts: check it with a count it merges")
    fam = {str(k): Path(v) for k, v in family.items()} if family is not None else None
    if fam is not None and "base" not in fam:
        raise ValueError(f"family={sorted(fam)!r} has no 'base'")
    if isinstance(models, Mapping):
        base = fam["base"] if fam is not None else shared_family(1)["base"]
        return Path(base), {str(k): Path(v) for k, v in models.items()}
    if isinstance(models, Sequence):
        names = [str(m) for m in models]
        if fam is None:
            known = family_names(26)[1:]
            unknown = [m for m in names if m not in known]
            if unknown:
                raise ValueError(f"models={names!r} names {unknown}: the kit's family has models "
                                 "'a', 'b', 'c', ...; pass family= with yours, or {name: folder}")
            fam = shared_family(max(known.index(m) + 1 for m in names))
        unknown = [m for m in names if m not in fam or m == "base"]
        if unknown:
            raise ValueError(f"models={names!r} names {unknown}, not models of the family "
                             f"({[k for k in fam if k != 'base']})")
        return Path(fam["base"]), {m: fam[m] for m in names}
    if fam is None:
        n = models if isinstance(models, int) else probe_count(c.impl, wanted)
        fam = shared_family(n)
    available = [k for k in fam if k != "base"]
    if isinstance(models, int):
        n = models
    else:  # as many as it takes, nearest ``wanted``, within what the family has
        n = min(probe_count(c.impl, wanted), len(available))
    if len(available) < max(n, low):
        raise ValueError(f"the family has {len(available)} model(s) besides the base "
                         f"({available}) but {who} needs {max(n, low)}: pass a larger family, "
                         f"e.g. build_family(root, names=family_names({max(n, low)})), or "
                         "leave family= out")
    return Path(fam["base"]), {m: fam[m] for m in available[:n]}
