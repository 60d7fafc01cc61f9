"""``lingoforge.json``: lingoforge's own facts about a model folder (what an ELO sub-model
holds, which base an adapter was trained on, how a merge was made).

A module of its own, without torch, because both :mod:`engine.models.modelio` and
:mod:`engine.models.adapters` (and the artifacts) read it; :mod:`engine.models.modelio` re-exports
these names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["META_FILE", "read_meta", "write_meta"]

META_FILE = "lingoforge.json"


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(folder: Path) -> dict[str, Any]:
    """lingoforge's own facts about a model folder (empty when absent)."""
    f = Path(folder) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
