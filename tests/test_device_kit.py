"""The device kit, as far as this machine can imitate the lent GPU machine: a fresh environment holding only what
the device image holds (CPU torch and Python 3.11 here), the wheels `benchmarks/device_kit.py` fetches for it, and
`benchmarks/device_run.sh` running both halves of the suite's tiny CPU dry run into $OUT. Needs the package index."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

from flair_hf_benchmarks import device_kit

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_the_kit_carries_what_the_image_lacks_or_rules_out():
    needed = device_kit.requirement_closure("flair-hf", "3.12")
    carry = device_kit.to_carry(needed)
    assert {"datasets", "evaluate", "ftfy"} <= carry.keys()  # absent from the image
    assert carry["transformers"] == __import__("transformers").__version__  # CI's version, not the image's 5.17.0
    assert "huggingface-hub" in carry  # transformers needs >= 2.4; the image has 1.33.0
    assert not {"torch", "numpy", "pyarrow", "pandas", "pillow", "accelerate", "tokenizers"} & carry.keys()


@pytest.fixture(scope="module")
def image_like_python(tmp_path_factory):
    """A new virtual environment with the image's copies of what flair-hf needs and the kit does not carry, plus the
    image's transformers and huggingface_hub (which the carried wheels must shadow)."""
    root = tmp_path_factory.mktemp("image")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = str(root / "venv" / "bin" / "python")
    needed = device_kit.requirement_closure("flair-hf", PYTHON_VERSION)
    image = [name for name in needed if name in device_kit.DEVICE_IMAGE and name != "torch"]  # CPU torch instead
    # the image's version, or the newest before it that this Python has (numpy 2.5 needs Python 3.12)
    pins = [f"{name}<={version}" if (version := device_kit.DEVICE_IMAGE[name]) else name for name in image]
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for packages in (["torch==2.13.0"], [*pins, "pytest"]):
        result = subprocess.run(pip + packages, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    return python


def test_run_script_runs_both_halves_of_the_dry_run_in_an_image_like_environment(image_like_python, tmp_path):
    wheels = tmp_path / "whl"
    device_kit.main(["--dest", str(wheels), "--python-version", PYTHON_VERSION])
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=image_like_python, WHEELS=str(wheels), OUT=str(out), SITE=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    for part, extra in (("1", ["--sections", "correctness,scoring,training"]), ("2", [])):
        command = ["bash", str(ROOT / "benchmarks" / "device_run.sh"), part, "--device", "cpu", "--scale", "tiny", "--skip-pytest", *extra]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        report = json.loads((out / f"gpu-suite-{part}.json").read_text())
        assert report["sections"] and all(status["ok"] for status in report["sections"].values()), report["sections"]
        assert report["transformers"] == __import__("transformers").__version__  # the carried copy, not the image's
    assert {"gpu-suite-1.json", "gpu-suite-2.json", "log-1.txt", "log-2.txt", "environment-1.txt", "environment-2.txt"} <= {
        path.name for path in out.iterdir()
    }
    assert len(list(out.iterdir())) <= 8  # what a device call brings back
