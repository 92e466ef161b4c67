"""`flair-hf`, the console command `pip install -e .` installs: each name runs its script's `main`, as the manual's
commands section says, with the script's own options, output and errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from manual import ROOT, bash_commands, page, run_command, section, workdir

FLAIR_HF = str(Path(sys.executable).parent / "flair-hf")
SCRIPTS = {  # the manual's table: command -> script
    "convert": "conversion/convert_flair_to_hf.py",
    "export-onnx": "conversion/export_onnx.py",
    "offline-demo": "conversion/offline_demo.py",
    "mosaics": "training/mosaics.py",
    "prepare-data": "training/prepare_data.py",
    "train": "training/train.py",
    "evaluate retrieval": "benchmarks/evaluate_retrieval.py",
    "evaluate classification": "benchmarks/evaluate_classification.py",
    "evaluate segmentation": "benchmarks/evaluate_segmentation.py",
    "visualize": "benchmarks/visualize.py",
    "demo": "demo/app.py",
}


def flair_hf(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([FLAIR_HF, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def metrics(path: Path) -> dict:
    """The retrieval metrics of an evaluation's JSON (its timings differ from run to run)."""
    (record,) = json.loads(path.read_text())
    return record["metrics"]


def test_every_command_is_its_scripts_main_as_the_manual_tables_it():
    from flair_hf.cli import commands

    known = commands()
    assert set(known) == set(SCRIPTS)
    table = section("index.md", "Commands")
    for name, script in SCRIPTS.items():
        assert f"| `flair-hf {name}` | `{script}`" in table, name
        module = sys.modules.get(known[name].module) or __import__(known[name].module, fromlist=["main"])
        assert known[name].load() is module.main and Path(module.__file__).resolve() == ROOT / script, name


@pytest.mark.parametrize("name", ["convert", "evaluate retrieval", "train"])
def test_a_commands_help_and_errors_name_it(name):
    result = flair_hf(*name.split(), "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: flair-hf {name}"), result.stdout[:300]


def test_the_listing_names_every_command_and_a_wrong_name_is_one_line():
    listing = flair_hf()
    assert listing.returncode == 0
    assert all(f"  {name} " in listing.stdout for name in SCRIPTS), listing.stdout
    for words, message in (
        (["evaluate"], "error: flair-hf has no command 'evaluate': one of evaluate classification, evaluate retrieval, "
                       "evaluate segmentation"),
        (["evaluat", "retrieval"], "error: flair-hf has no command 'evaluat retrieval': run flair-hf for the list"),
    ):  # fmt: skip
        result = flair_hf(*words)
        assert result.returncode == 1 and result.stderr.strip() == message, result.stderr


def test_the_trainers_errors_stay_one_line_through_the_command():
    result = flair_hf("train", "--learning-rate", "0.1")
    assert result.returncode == 1 and result.stderr.strip() == "error: unknown option --learning-rate: did you mean --lr?"


def test_the_manuals_commands_run_as_written_and_print_what_their_scripts_print(tmp_path):
    work = workdir(tmp_path)
    commands = bash_commands(section("index.md", "Commands"))
    assert [c.split()[:2] for c in commands] == [["flair-hf"], ["flair-hf", "offline-demo"], ["flair-hf", "mosaics"],
                                                 ["flair-hf", "evaluate"]]  # fmt: skip
    outputs = [run_command(command, work).stdout for command in commands]
    assert outputs[1] == run_command("python conversion/offline_demo.py", work).stdout
    run_command(commands[3].replace("flair-hf evaluate retrieval", "python benchmarks/evaluate_retrieval.py")
                .replace("retrieval-small.json", "by-script.json"), work)  # fmt: skip
    by_command, by_script = (metrics(work / "out" / name) for name in ("retrieval-small.json", "by-script.json"))
    assert by_command == by_script and by_command["text_to_image_R@1"] > 100 / 40, by_command
    assert "flair-hf" in page("README.md")
