"""lingoforge against mergekit as an oracle (benchmarks/speed/mergekit_oracle.py).

mergekit (LGPL) is never imported: it runs as ``mergekit-yaml`` from its own virtual
environment. The test runs only when ``LINGOFORGE_MERGEKIT`` names that executable
(``nox -s mergekit_oracle`` sets it up); otherwise it is skipped with that reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

MERGEKIT = os.environ.get("LINGOFORGE_MERGEKIT")


@pytest.mark.skipif(not MERGEKIT, reason="set LINGOFORGE_MERGEKIT to a mergekit-yaml executable "
                                         "(mergekit in its own venv) to run the oracle")
def test_every_merge_method_agrees_with_mergekit(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "speed"))
    try:
        import mergekit_oracle
    finally:
        sys.path.pop(0)
    rc = mergekit_oracle.main(["--mergekit", MERGEKIT, "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert printed.count("OK ") == 14  # 11 exact cases + DARE, DELLA, DELLA-linear statistics
