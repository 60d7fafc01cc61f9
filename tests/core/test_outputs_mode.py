"""Outputs honour the process umask: a team on a shared machine can read a run's folders
(``tempfile`` alone would leave every stage folder 0700 and report files 0600)."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import ties_recipe

from engine.cli.commands import main


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_run_creates_folders_and_files_with_the_umask_modes(tmp_path, tiny_model_family, mask):
    fam = tiny_model_family
    recipe = ties_recipe(tmp_path / "merge.yaml", fam, "modes")
    work = tmp_path / "work"
    before = os.umask(mask)
    try:
        assert main(["run", str(recipe), "--workdir", str(work)]) == 0
    finally:
        os.umask(before)
    seen = set()
    for root, dirs, files in os.walk(work):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            want = (0o777 if stat.S_ISDIR(st.st_mode) else 0o666) & ~mask
            assert stat.S_IMODE(st.st_mode) & 0o777 == want, (path, oct(st.st_mode))
            seen.add(name)
    # the stage version folder, its weights, the reports and the run log were all checked
    assert {"model.safetensors", "report.json", "report.md", "run.log"} <= seen, seen
    assert os.path.realpath(work / "merged") != str(work / "merged")  # a link to its version
