"""The paper's claim in miniature: FLAIR's loss against the global sigmoid loss alone, on held-out FLAIR mosaics.

    python benchmarks/benchmark_learning.py [--work-dir runs/learning] [--seeds 0 1 2]
        [--output benchmarks/results/learning-cpu.json] [--max-steps N] [--train-mosaics N] [--test-mosaics N]

Per seed, `training/train.py` trains `training/configs/mosaics_cpu.yaml` three ways: with FLAIR's loss
(text-conditioned sigmoid + multi-positive sigmoid), with the global multi-positive sigmoid loss alone
(`--add-tcs-loss false`, the SigLIP-style baseline the paper compares against) and not at all (`--lr 0`, one step:
the untrained network, an empirical chance level). The mosaics are built first when WORK_DIR lacks them (20,000
training, 500 held-out, `training/mosaics.py`); mosaics and runs are reused (finished) or resumed (interrupted) when made by the
same command, recipe and code (others are an error, never a silent reuse). Each final model is then evaluated on the held-out mosaics by
the evaluation CLIs: one-item sentence -> image and long caption -> image retrieval in flair, topk and global
scoring, segmentation mIoU (similarity maps, as the paper, and pooling-attention maps) and zero-shot classification
of single items. On the first seed's
FLAIR model it also measures drift: bf16 autocast and ONNX Runtime fp32 / int8 against PyTorch fp32 (top-1
agreement and R@1 of one-item retrieval in flair scoring). Writes JSON (per run; mean and sample standard deviation
over seeds; analytic chance) and a PNG of the training loss and the in-training evaluation curves.
"""

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flair_hf.evaluation import encode_features, flatten_captions, retrieval_scores
from flair_hf.retrieval_data import load_benchmark
from flair_hf_benchmarks import evaluate_classification, evaluate_retrieval, evaluate_segmentation
from flair_hf_benchmarks.model_loading import load_model_and_processor
from flair_hf_benchmarks.reporting import write_results
from flair_hf_training.mosaics import SAMPLES_PER_SHARD

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "training" / "configs" / "mosaics_cpu.yaml"
METHODS = {  # train.py options on top of the recipe
    "flair": [],
    "global": ["--add-tcs-loss", "false", "--eval-mode", "global"],
    "untrained": ["--lr", "0", "--max-steps", "1"],
}
RETRIEVAL = {"fashion-mosaics": "items", "fashion-mosaics-long": "long"}
MODES = ("flair", "topk", "global")


def run(command: list[str], log: Path) -> None:
    with log.open("w") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:3])} failed (exit {result.returncode}); see {log}")


def code_sha256() -> str:
    """A digest of the code that makes the mosaics and trains: the library and the training application."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "src" / "flair_hf").rglob("*.py"), *(ROOT / "training").glob("*.py"), RECIPE]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def write_stamp(path: Path, record: dict) -> None:
    """`path`'s stamp, replaced whole (never half-written)."""
    partial = path / "benchmark_learning.json.partial"
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path / "benchmark_learning.json")


def reused(path: Path, record: dict) -> bool:
    """Whether `path` holds the finished work `record` describes. A stamp with another record is an error, whatever
    state its work is in: an unfinished run is resumed only by the command, recipe and code that started it."""
    stamp = path / "benchmark_learning.json"
    if not stamp.is_file():
        return False
    recorded = json.loads(stamp.read_text())
    if {key: recorded.get(key) for key in record} != record:
        raise SystemExit(f"error: {path} was made by another command, recipe or code: delete it or pass another --work-dir")
    if not recorded.get("complete"):
        return False
    print(f"reusing {path}", flush=True)
    return True


def stamped(path: Path, record: dict, command: list[str], log: Path) -> None:
    """Run `command` for `path`, stamped before it starts (so an interrupted run is checked on resume) and after."""
    path.mkdir(parents=True, exist_ok=True)
    write_stamp(path, {**record, "complete": False})
    start = time.perf_counter()
    run(command, log)
    write_stamp(path, {**record, "complete": True, "seconds": time.perf_counter() - start})


def build_mosaics(work: Path, args) -> tuple[Path, Path]:
    """The training shards and the held-out layouts under `work`, built once (mosaics.py writes whole or nothing)."""
    paths = {"train": (work / "mosaics-train", 0, args.train_mosaics), "test": (work / "mosaics-test", 1, args.test_mosaics)}
    code = code_sha256()
    for split, (path, seed, count) in paths.items():
        command = [sys.executable, "-m", "flair_hf_training.mosaics", "--split", split, "--seed", str(seed), "--count", str(count)]
        command += ["--source", args.source] if args.source else []
        record = {"command": command[1:], "code_sha256": code}
        if path.exists() and not (path / "benchmark_learning.json").is_file():
            raise SystemExit(f"error: {path} was not made by this benchmark: delete it or pass another --work-dir")
        if not (path.exists() and reused(path, record)):
            print(f"building {count} {split} mosaics in {path}", flush=True)
            work.mkdir(parents=True, exist_ok=True)
            stamped(path, record, command + ["--output", str(path / "mosaics")], work / f"mosaics-{split}.log")
    return paths["train"][0] / "mosaics", paths["test"][0] / "mosaics"


def train(work: Path, train_data: Path, test_data: Path, method: str, seed: int, args) -> Path:
    """The run's directory, trained now, resumed, or reused when made earlier by the same command, recipe and code."""
    output = work / "runs" / f"{method}-seed{seed}"
    shards = math.ceil(args.train_mosaics / SAMPLES_PER_SHARD)
    command = [
        sys.executable, "-m", "flair_hf_training.train", "--config", str(RECIPE), "--seed", str(seed),
        "--train-data", f"{train_data}/mosaics-{{0000..{shards - 1:04d}}}.tar", "--train-num-samples", str(args.train_mosaics),
        "--eval-data-root", str(test_data), "--output-dir", str(output),
    ]  # fmt: skip
    command += (["--max-steps", str(args.max_steps)] if args.max_steps else []) + METHODS[method]
    record = {"command": command[1:], "code_sha256": code_sha256()}
    if output.exists() and not (output / "benchmark_learning.json").is_file():
        raise SystemExit(f"error: {output} was not made by this benchmark: delete it or pass another --work-dir")
    if not reused(output, record):
        print(f"training {output.name}", flush=True)
        stamped(output, record, command + ["--resume", "latest"], output.parent / f"{output.name}.log")
    return output


def evaluate(model_dir: Path, test_data: Path, scratch: Path) -> dict:
    """Held-out metrics of one model, flat: `items/flair/R@1`, `segmentation/similarity/mIoU`, `classification/clip/top1`, ..."""
    metrics = {}
    for mode in MODES:
        argv = ["--model", str(model_dir), "--data-root", str(test_data), "--mode", mode, "--output", str(scratch / "retrieval.json")]
        for result in evaluate_retrieval.main(argv + [f"--benchmark={name}" for name in RETRIEVAL]):
            for k in (1, 5):
                metrics[f"{RETRIEVAL[result['benchmark']]}/{mode}/R@{k}"] = result["metrics"][f"text_to_image_R@{k}"]
    for method in ("similarity", "attention"):
        (segmentation,) = evaluate_segmentation.main([
            "--model", str(model_dir), "--benchmark", "fashion-mosaics", "--data-root", str(test_data), "--crop", "96",
            "--stride", "48", "--method", method, "--output", str(scratch / "segmentation.json"),
        ])  # fmt: skip
        metrics[f"segmentation/{method}/mIoU"] = segmentation["mIoU"]
    classification = evaluate_classification.main([
        "--model", str(model_dir), "--data-root", str(test_data / "fashion-items"), "--output", str(scratch / "classification.json"),
    ])  # fmt: skip
    for scoring, accuracy in classification["accuracy"].items():
        metrics[f"classification/{scoring}/top1"] = accuracy["top1"]
    return metrics


def chance_levels(test_data: Path) -> dict:
    """Retrieval R@k = k / images (one correct image a query); classification 1 / classes (balanced guess)."""
    chance = {}
    for benchmark, short in RETRIEVAL.items():
        images = len(load_benchmark(benchmark, str(test_data)))
        chance.update({f"{short}/{mode}/R@{k}": 100 * k / images for mode in MODES for k in (1, 5)})
    classes = [folder for folder in (test_data / "fashion-items").iterdir() if folder.is_dir() and any(folder.iterdir())]  # as loaded
    chance.update({f"classification/{scoring}/top1": 100 / len(classes) for scoring in ("clip", "flair")})
    return chance


def summarise(per_seed: list[dict]) -> dict:
    return {
        name: {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        for name in per_seed[0]
        for values in [[metrics[name] for metrics in per_seed]]
    }  # fmt: skip


def claim(summary: dict) -> dict:
    """FLAIR (text-conditioned scores) minus the global-loss baseline (global scores), against the seeds' spread."""
    comparisons = {  # fixed before any run: FLAIR's own scores against the baseline's; segmentation as the paper's (similarity)
        "one-item R@1": ("items/flair/R@1", "items/global/R@1"),
        "segmentation mIoU": ("segmentation/similarity/mIoU", "segmentation/similarity/mIoU"),
    }
    verdict = {}
    for label, (ours, theirs) in comparisons.items():
        flair, baseline = summary["flair"][ours], summary["global"][theirs]
        margin, spread = flair["mean"] - baseline["mean"], max(flair["std"], baseline["std"])
        verdict[label] = {"flair": flair["mean"], "global_loss": baseline["mean"], "margin": margin, "spread": spread, "holds": margin > spread}
    return verdict


ROWS = {  # table row -> metric name
    "one-item sentence -> image R@1": "items/{mode}/R@1",
    "one-item sentence -> image R@5": "items/{mode}/R@5",
    "long caption -> image R@1": "long/{mode}/R@1",
    "long caption -> image R@5": "long/{mode}/R@5",
    "segmentation mIoU, similarity maps": "segmentation/similarity/mIoU",
    "segmentation mIoU, attention maps": "segmentation/attention/mIoU",
    "zero-shot top-1, single items": "classification/{scoring}/top1",
}
COLUMNS = {  # column -> (method, retrieval mode, classification scoring)
    "untrained": ("untrained", "flair", "flair"),
    "global loss, global scores": ("global", "global", "clip"),
    "FLAIR, global scores": ("flair", "global", "clip"),
    "FLAIR, topk": ("flair", "topk", "flair"),
    "FLAIR, flair scores": ("flair", "flair", "flair"),
}


def markdown_table(result: dict) -> str:
    """Mean ± sample standard deviation over seeds (percent), chance where it is analytic."""
    lines = ["| held-out metric (%) | chance | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for row, template in ROWS.items():
        cells = []
        for method, mode, scoring in COLUMNS.values():
            stats = result["summary"][method][template.format(mode=mode, scoring=scoring)]
            cells.append(f"{stats['mean']:.1f} ± {stats['std']:.1f}")
        chance = result["chance"].get(template.format(mode="flair", scoring="flair"))
        lines.append(f"| {row} | {'–' if chance is None else f'{chance:.1f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drift_table(drift_result: dict) -> str:
    """One-item retrieval of the first seed's FLAIR model (flair scores) in other precisions and runtimes."""
    lines = [f"| {drift_result['queries']} one-item queries | top-1 equal to PyTorch fp32 (%) | R@1 (%) |", "|---|---|---|",
             f"| PyTorch fp32 | 100.0 | {drift_result['fp32 R@1']:.1f} |"]  # fmt: skip
    lines += [f"| {name} | {v['top1_agreement']:.1f} | {v['R@1']:.1f} |" for name, v in drift_result.items() if isinstance(v, dict)]
    return "\n".join(lines)


def drift(model_dir: Path, test_data: Path, scratch: Path) -> dict:
    """One-item retrieval (flair scoring) under bf16 autocast and ONNX Runtime fp32 / int8, against PyTorch fp32."""
    dataset = load_benchmark("fashion-mosaics", str(test_data))
    captions, text_to_image = flatten_captions(dataset)
    text_to_image = torch.as_tensor(text_to_image)

    def top1(model, processor, autocast_dtype=None) -> torch.Tensor:
        features = encode_features(model, processor, dataset, captions, autocast_dtype=autocast_dtype, device="cpu", progress=False)
        return retrieval_scores(model.text_conditioned_pooling, features, "flair", device="cpu", autocast_dtype=autocast_dtype, progress=False).argmax(0)

    model, processor = load_model_and_processor(str(model_dir), device="cpu")
    reference = top1(model, processor)
    variants = {"bf16 autocast": top1(model, processor, torch.bfloat16)}
    for quantize in ("fp32", "int8"):
        export = scratch / f"onnx-{quantize}"
        command = [sys.executable, "-m", "flair_hf_conversion.export_onnx", str(model_dir), str(export)]
        run(command + (["--quantize", "int8"] if quantize == "int8" else []), scratch / f"export-{quantize}.log")
        variants[f"onnx {quantize}"] = top1(*load_model_and_processor(str(export), device="cpu"))
    result = {"queries": len(captions), "fp32 R@1": 100 * (reference == text_to_image).float().mean().item()}
    for name, retrieved in variants.items():
        result[name] = {
            "top1_agreement": 100 * (retrieved == reference).float().mean().item(),
            "R@1": 100 * (retrieved == text_to_image).float().mean().item(),
        }
    return result


def curves(run_dir: Path) -> dict:
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return {
        "loss": [(record["step"], record["loss"]) for record in losses],
        **{RETRIEVAL[b]: [(r["step"], r["metrics"]["text_to_image_R@1"]) for r in evals if r["benchmark"] == b] for b in RETRIEVAL},
    }


def plot(all_curves: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    titles = {"loss": "training loss (each its own)", "items": "one-item sentence -> image R@1 (%)", "long": "long caption -> image R@1 (%)"}
    colours = {"flair": "tab:blue", "global": "tab:orange"}
    for axis, (name, title) in zip(axes, titles.items()):
        for (method, seed), series in sorted(all_curves.items()):
            steps, values = zip(*series[name])
            window = 25 if name == "loss" else 1
            smoothed = [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
            label = f"{'FLAIR loss, flair scores' if method == 'flair' else 'global loss, global scores'}" if seed == min(s for _, s in all_curves) else None
            axis.plot(steps, smoothed, color=colours[method], alpha=0.8, label=label, marker=None if name == "loss" else "o", markersize=3)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    partial = output.with_name(output.name + ".partial")
    figure.savefig(partial, dpi=110, format="png")
    partial.replace(output)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/learning", help="mosaics and runs (reused when present)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--output", default="benchmarks/results/learning-cpu.json", help="JSON; the PNG goes next to it")
    parser.add_argument("--max-steps", type=int, help="steps per run (default: the recipe's)")
    parser.add_argument("--train-mosaics", type=int, default=20000, help="training mosaics (default: 20000)")
    parser.add_argument("--test-mosaics", type=int, default=500, help="held-out mosaics (default: 500)")
    parser.add_argument("--source", help="Fashion-MNIST's *-ubyte.gz folder (default: Debian's dataset-fashion-mnist)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        parser.error("--seeds needs two or more distinct seeds (the verdict compares against their spread)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work, output = Path(args.work_dir).resolve(), Path(args.output)
    train_data, test_data = build_mosaics(work, args)
    runs = {(method, seed): train(work, train_data, test_data, method, seed, args) for seed in args.seeds for method in METHODS}
    per_run, seconds = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for (method, seed), run_dir in runs.items():
            per_run[f"{method}-seed{seed}"] = evaluate(run_dir / "final", test_data, Path(scratch))
            seconds[f"{method}-seed{seed}"] = json.loads((run_dir / "benchmark_learning.json").read_text()).get("seconds")
        drift_result = drift(runs[("flair", args.seeds[0])] / "final", test_data, Path(scratch))
    summary = {method: summarise([per_run[f"{method}-seed{seed}"] for seed in args.seeds]) for method in METHODS}
    result = {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "seeds": args.seeds,
        "max_steps": args.max_steps,
        "data": {"train_mosaics": args.train_mosaics, "test_mosaics": args.test_mosaics, "train_seed": 0, "test_seed": 1},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        "claim": claim(summary),
        "summary": summary,
        "chance": chance_levels(test_data),
        "drift": drift_result,
        "per_run": per_run,
        "training_seconds": seconds,
    }
    plot({key: curves(run_dir) for key, run_dir in runs.items() if key[0] != "untrained"}, output.with_suffix(".png"))
    write_results(result, markdown_table(result) + "\n\n" + drift_table(result["drift"]), output)
    for label, verdict in result["claim"].items():
        print(f"{label}: FLAIR {verdict['flair']:.2f}, global loss {verdict['global_loss']:.2f}, margin {verdict['margin']:+.2f} "
              f"(seed spread {verdict['spread']:.2f}): {'holds' if verdict['holds'] else 'does not hold'}")  # fmt: skip
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
