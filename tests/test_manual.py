"""The user's manual: README.md is a landing page, docs/ builds as a site with warnings as errors, and every page's
Python runs as written, offline, on what the repository ships."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from manual import PAGES, ROOT, code_blocks, page, run_python

# what each page's Python prints, in order, as patterns (its blocks run as one script, as a reader runs them one
# after another)
LOGITS = r"FLAIR logits: tensor\(\[\[.*CLIP logits: tensor\(\[\["
PIPELINE = r"\[\{'score': [\d.e-]+, 'label': '[a-z ]+'\}, "
PRINTS = {
    "README.md": [LOGITS],
    "docs/index.md": [LOGITS, r"tensor\(\[\[[\d.e-]+, [\d.e-]+\]\]\)"],
    "docs/api.md": [PIPELINE, PIPELINE, r"\(2, 64\)"],
    # the dress's map peaks in its cell: the bottom middle third of the 96-pixel mosaic
    "docs/dense-maps.md": [r"torch.Size\(\[1, 1, 96, 96\]\) peak at row, column \((6[4-9]|[78]\d|9[0-5]), (3[2-9]|[45]\d|6[0-3])\)"],
}
# pages whose Python needs a command of theirs run first: the test that runs both
RUN_ELSEWHERE = {"docs/deployment.md": "tests/test_onnx.py::test_deploying_commands_and_example_run_as_written"}
DEVELOPMENT_WORDS = ["search tool", "device tool", "subagent", "helper agent", "was lent", "this session", "this work"]


def test_every_page_with_python_is_run_here_or_names_its_test():
    with_python = [name for name in PAGES if code_blocks((ROOT / name).read_text(), "python")]
    assert sorted(with_python) == sorted([*PRINTS, *RUN_ELSEWHERE])
    for name, test in RUN_ELSEWHERE.items():
        path, function = test.split("::")
        assert f"def {function}(" in (ROOT / path).read_text()


@pytest.mark.parametrize("name", sorted(PRINTS))
def test_the_pages_python_runs_as_written(name, tmp_path):
    out = run_python("\n".join(code_blocks((ROOT / name).read_text(), "python")), tmp_path)
    position = 0
    for expected in PRINTS[name]:
        found = re.compile(expected, flags=re.S).search(out, position)
        assert found, (expected, out[-3000:])
        position = found.end()


def test_the_readme_is_a_short_landing_page():
    readme = page("README.md")
    assert len(readme.splitlines()) <= 200
    for name in re.findall(r"\]\(docs/([\w-]+\.md)", readme):
        assert (ROOT / "docs" / name).is_file(), name


@pytest.mark.parametrize("name", PAGES)
def test_the_manual_speaks_to_users_only(name):
    text = (ROOT / name).read_text().lower()
    assert not [word for word in DEVELOPMENT_WORDS if word in text]


# each row of the README's "Current figures": its JSON, the paths of its values in it, their format
FIGURES = {
    "inference, ": ("inference-cpu.json", [("inference", "flair", "speed_ours_over_original")], "{:.2f}x"),
    "all-pairs FLAIR scoring": ("scoring-cpu.json", [("speedup",)], "{:.2f}x"),
    "training step": ("training-cpu.json", [("training_step", "flair", "speed_ours_over_original"),
                                            ("training_step", "full", "speed_ours_over_original")], "{:.2f}x"),
    "tokenizer": ("tokenizer-cpu.json", [("speed_ratio_flair_hf_over_original",)], "{:.2f}x"),
    "ONNX Runtime int8": ("onnx-cpu.json", [("backends", "onnx-int8", "image", "speedup_vs_pytorch")], "{:.2f}x"),
    "the bundled model": ("learning-cpu.json", [("per_run", "flair-seed0", "long/flair/R@1")], "{:.1f} %"),
    "drift on the bundled model, one-item R@1": ("learning-cpu.json", [("drift", "fp32 R@1"), ("drift", "bf16 autocast", "R@1"),
                                                                       ("drift", "onnx int8", "R@1")], "{:.1f} %"),
    "drift on the bundled model, top-1 agreement": ("learning-cpu.json", [("drift", "bf16 autocast", "top1_agreement"),
                                                                          ("drift", "onnx int8", "top1_agreement")], "{:.1f} %"),
    "topk against flair scoring": ("learning-cpu.json", [("per_run", "flair-seed0", "long/topk/R@1"),
                                                         ("per_run", "flair-seed0", "long/flair/R@1")], "{:.1f} %"),
}  # fmt: skip


def test_the_readmes_figures_are_their_json():
    section = page("README.md").split("## Current figures\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(FIGURES)
    for (label, value, source), (prefix, (name, keys, form)) in zip(rows, FIGURES.items()):
        assert label.startswith(prefix) and source == f"[JSON](benchmarks/results/{name})", (label, source)
        data = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
        assert value == " / ".join(form.format(functools.reduce(dict.get, path, data)) for path in keys), label


def build(docs_dir, site_dir):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(docs_dir.parent / "mkdocs.yml"),
               "--site-dir", str(site_dir)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=docs_dir.parent)


def test_the_docs_build_as_a_site_with_warnings_as_errors(tmp_path):
    result = build(ROOT / "docs", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    site = tmp_path / "site"
    assert "get_text_conditioned_image_features" in (site / "api" / "index.html").read_text()  # the API from docstrings
    assert (site / "repository" / "benchmarks" / "results" / "learning-cpu.png").is_file()  # a linked repository file
    assert 'src="../repository/demo/screenshots/demo-captions.png"' in (site / "deployment" / "index.html").read_text()


@pytest.mark.parametrize("broken, named", [("[gone](missing.md)", "missing.md"), ("[gone](training.md#no-such-section)", "#no-such-section"),
                                           ("![gone](../no/such.png)", "no/such.png")])  # fmt: skip
def test_a_broken_link_fails_the_docs_build(tmp_path, broken, named):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy)
    for linked in ("benchmarks/results", "demo/screenshots"):
        shutil.copytree(ROOT / linked, copy / linked)
    shutil.copytree(ROOT / "src", copy / "src")
    (copy / "docs" / "parity.md").write_text((copy / "docs" / "parity.md").read_text() + f"\n{broken}\n")
    result = build(copy / "docs", tmp_path / "site")
    assert result.returncode != 0 and named in result.stderr, result.stderr[-2000:]


def test_the_getting_started_and_converting_commands_run_as_written(tmp_path):
    from manual import bash_commands, run_command, section, workdir

    work = workdir(tmp_path)
    demo = bash_commands(section("index.md", "Offline demo"))
    assert demo == ["python conversion/offline_demo.py", "python conversion/offline_demo.py --convert-tiny"]
    for command in demo:
        assert "FLAIR logits" in run_command(command, work).stdout
    offline = [c for c in bash_commands(page("converting.md")) if "tests/fixtures/tiny" in c]
    assert len(offline) == 1
    assert "verified against the original forward" in run_command(offline[0], work).stdout
    assert json.loads((work / "out" / "flair-tiny-hf" / "config.json").read_text())["model_type"] == "flair"


def test_the_offline_evaluation_commands_run_as_written(tmp_path):
    from manual import bash_commands, run_command, workdir

    commands = bash_commands(page("evaluation.md").split("## Retrieval evaluation", 1)[0])
    assert [c.split()[1] for c in commands] == ["training/mosaics.py", "benchmarks/evaluate_retrieval.py", "benchmarks/evaluate_classification.py"]
    work = workdir(tmp_path)
    for command in commands:
        run_command(command, work)
    retrieval = json.loads((work / "out" / "retrieval.json").read_text())
    assert [r["benchmark"] for r in retrieval] == ["fashion-mosaics", "fashion-mosaics-long"]
    assert retrieval[1]["metrics"]["num_images"] == 500 and retrieval[1]["metrics"]["text_to_image_R@1"] > 10  # chance 0.2
    classification = json.loads((work / "out" / "classification.json").read_text())
    assert classification["num_classes"] == 10 and set(classification["accuracy"]) == {"clip", "flair"}
