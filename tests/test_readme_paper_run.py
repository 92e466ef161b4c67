"""The Training page's "Reproducing a paper run": every command, as written, at small scale.

Captions from a 20-row DreamLIP-style CSV whose URLs point at a local HTTP server, 4 samples per shard; the training
launch runs with the tiny model on 2 CPU processes (`ddp_cpu.yaml`) for 2 steps instead of 8 GPUs; the Slurm script
is syntax-checked.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmark_layouts import build_data_root
from conftest import ROOT
from test_prepare_data import image_server, write_caption_csv
from test_training import free_port


def readme_commands() -> list[str]:
    """The commands of the section's bash blocks, pip dropped."""
    from manual import bash_commands, section

    return [c for c in bash_commands(section("training.md", "Reproducing a paper run")) if not c.startswith("pip ")]


def run(command: list[str], cwd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-8000:].replace("\\n", "\n"))
    return result


def test_readme_paper_run_commands(tmp_path):
    prepare, launch, sbatch, evaluate = readme_commands()
    assert prepare.startswith("python training/prepare_data.py") and launch.startswith("accelerate launch")
    assert sbatch.startswith("sbatch training/accelerate/slurm_fsdp2.sbatch") and evaluate.startswith("python benchmarks/")
    for name in ("training", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    benchmarks = build_data_root(tmp_path / "flair-benchmarks")
    (tmp_path / "www").mkdir()
    for i in range(20):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "www" / f"image_{i}.jpg")

    # 1. captions -> shards as written (the CSV name of the README), 4 samples per shard so that 2 ranks get shards
    with image_server(tmp_path / "www") as url:
        write_caption_csv(tmp_path / "cc3m_3long_3short_1raw_captions_url.csv", url, 20, missing={4})
        printed = run([sys.executable, *shlex.split(prepare)[1:], "--samples-per-shard", "4"], tmp_path).stdout
    assert "rows read: 20, images fetched: 19, failed: 1" in printed
    summary = json.loads((tmp_path / "shards" / "cc3m-recap" / "prepare_summary.json").read_text())
    train_options = re.search(r"train with: (.*)", printed).group(1)

    # 2. the 8-GPU launch at small scale: 2 CPU processes, tiny model, 2 steps, the printed data options
    small = launch.replace("ddp.yaml --num_processes 8", "ddp_cpu.yaml --num_processes 2")
    small = small.replace("training/configs/cc3m_recap.yaml", "training/configs/tiny_cpu.yaml")
    small = re.sub(r'--train-data "[^"]*" --train-num-samples \d+', train_options, small)
    small = small.replace("/data/flair-benchmarks", str(benchmarks)) + " --max-steps 2 --eval-every-steps 1"
    args = shlex.split(small)
    args[2:2] = ["--main_process_port", str(free_port())]
    run([sys.executable, "-m", "accelerate.commands.launch", *args[2:]], tmp_path, {"ACCELERATE_USE_CPU": "true"})
    records = [json.loads(line) for line in (tmp_path / "runs" / "flair-cc3m-recap" / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["benchmark"]) for r in records] == [(1, "coco"), (1, "flickr30k"), (2, "coco"), (2, "flickr30k")]
    assert summary["images_fetched"] == 19 and summary["shards"] == 5

    # 3. Slurm script: syntax only (no cluster here)
    run(["bash", "-n", shlex.split(sbatch)[1]], tmp_path)

    # 4. evaluation of the export, as written (data root swapped for the tiny layouts)
    result = run([sys.executable, *shlex.split(evaluate.replace("/data/flair-benchmarks", str(benchmarks)))[1:]], tmp_path)
    assert "| coco | flair |" in result.stdout
    evaluated = json.loads((tmp_path / "runs" / "flair-cc3m-recap" / "retrieval.json").read_text())
    final = {r["benchmark"]: r["metrics"] for r in records if r["step"] == 2}
    assert {r["benchmark"]: r["metrics"] for r in evaluated} == final


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp2_multinode.yaml"])
def test_readme_launch_configs_exist(name):
    assert (ROOT / "training" / "accelerate" / name).is_file()
