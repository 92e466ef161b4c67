"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) of the installed transformers version
on FlairModel, with transformers' CLIPModel under the same harness as a control (it must pass, or the harness is
broken). The common test files come from transformers' source distribution, fetched from the package index at run
time and never stored in this repository; the harness (`tests/transformers_common/`: CLIP's tiny tester sizes,
CLIPModelTest's flags and skips, stubs for the test modules the sdist lacks) is ours."""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import transformers

from conftest import ROOT

COMMON_FILES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py", "tests/test_pipeline_mixin.py")


def transformers_sdist(version: str) -> Path:
    """The transformers `version` source distribution, downloaded once into the temporary directory."""
    cache = Path(tempfile.gettempdir()) / f"transformers-sdist-{version}"
    found = sorted(cache.glob("transformers-*.tar.gz"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "-q", f"transformers=={version}", "--no-binary", ":all:",
                   "--no-deps", "--no-build-isolation", "-d", str(cache)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        found = sorted(cache.glob("transformers-*.tar.gz"))
        if result.returncode or not found:
            pytest.fail(f"could not fetch the transformers {version} sdist from the package index: {result.stderr[-500:]}")
    return found[0]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    """A scratch directory: our harness, transformers' common test files, and `src/transformers` (the installed one)."""
    work = tmp_path_factory.mktemp("transformers-common")
    shutil.copytree(ROOT / "tests" / "transformers_common", work, dirs_exist_ok=True)
    with tarfile.open(transformers_sdist(transformers.__version__)) as tar:
        for member in tar.getmembers():
            relative = member.name.split("/", 1)[-1]
            if relative in COMMON_FILES:
                (work / relative).write_bytes(tar.extractfile(member).read())
    missing = [name for name in COMMON_FILES if not (work / name).is_file()]
    assert not missing, f"the transformers {transformers.__version__} sdist lacks {missing}"
    (work / "tests" / "utils" / "tiny_model_summary.json").write_text("{}")  # read at import by test_pipeline_mixin
    (work / "src").mkdir()
    (work / "src" / "transformers").symlink_to(Path(transformers.__file__).parent)
    return work


def outcomes(junit_xml: Path) -> dict[str, dict[str, list[str]]]:
    """`{test class: {"passed" | "failed" | "skipped": [test names]}}` from a JUnit XML report."""
    counts = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        counts.setdefault(cls, {"passed": [], "failed": [], "skipped": []})[outcome].append(case.get("name"))
    return counts


def test_common_model_tests_pass_for_flair_as_for_clip(harness):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RUN_PIPELINE_TESTS": "0", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TFCOMMON_NO_FEATURE_SKIPS": "1", "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    report = harness / "report.xml"
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/models/flair/test_modeling_flair.py", "-q", "-p", "no:logging",
                             f"--junitxml={report}"], cwd=harness, env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert report.is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    counts = outcomes(report)
    assert {"CLIPModelSameHarnessTest", "FlairModelTest"} <= counts.keys(), f"the harness did not collect:\n{result.stdout[-3000:]}"
    clip, flair = counts["CLIPModelSameHarnessTest"], counts["FlairModelTest"]
    assert not clip["failed"] and len(clip["passed"]) >= 60, f"the CLIPModel control fails {clip['failed']}: the harness is broken"
    assert not flair["failed"], f"FlairModel fails transformers' common tests {flair['failed']}:\n{result.stdout[-4000:]}"
    assert len(flair["passed"]) >= len(clip["passed"]) - 1, flair  # CLIP alone has converted-key mappings to load
