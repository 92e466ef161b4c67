"""PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8, in one run, interleaved: image encoding, text
encoding at FLAIR caption lengths and pair scoring, with peak memory and each rate as a fraction of this machine's
measured fp32 matmul peak; and the int8 export's drift from fp32.

    python benchmarks/benchmark_onnx.py [--model-dir DIR] [--rounds 5] [--output benchmarks/results/onnx-cpu.json]

Without `--model-dir` the model is ViT-B-16-FLAIR with seeded random weights. The model is exported to ONNX (fp32
and int8) into a temporary directory. Each backend gets the same token ids, pixels and embeddings (preprocessing is
not timed); PyTorch runs as `FlairScorer` does (`get_text_embeds`, `get_image_and_token_features`,
`get_text_conditioned_image_features`), ONNX Runtime as `FlairOnnxModel` does. Peak memory is each backend's peak RSS
in a process of its own doing one round of the three workloads; the ONNX Runtime processes import only what
`flair_hf.onnx` needs (no torch, no transformers: the deployment).
"""

import argparse
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from flair_hf import FlairConfig, FlairModel
from flair_hf.scoring import flair_cosine
from flair_hf.onnx import FlairOnnxModel, ids_up_to_end_of_text
from flair_hf_benchmarks.measurement import interleaved_times, matmul_peak_flops, peak_rss_mib
from flair_hf_benchmarks.reporting import write_json
from flair_hf_benchmarks.synthetic import caption_ids
from flair_hf_conversion.convert_flair_to_hf import build_processor
from flair_hf_conversion.export_onnx import embedding_cosines, export

BACKENDS = ("pytorch", "onnx-fp32", "onnx-int8")
# what flair_hf.onnx imports, by distribution (with their own requirements): the deployment's packages
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "flatbuffers", "numpy", "packaging", "protobuf", "tokenizers", "pillow", "ftfy", "wcwidth", "tqdm")


def runtime_only_path(directory: Path) -> Path:
    """A directory of links to `flair_hf` and the runtime's distributions only, for `python -S` with PYTHONPATH set to
    it: an interpreter where torch and transformers are not installed, as on a deployment image."""
    import flair_hf

    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "flair_hf").exists():  # made once, reused
        (directory / "flair_hf").symlink_to(Path(flair_hf.__file__).parent)
    for name in RUNTIME_DISTRIBUTIONS:
        distribution = importlib.metadata.distribution(name)
        tops = {Path(str(file)).parts[0] for file in distribution.files or [] if not str(file).startswith("..")}
        for top in tops - {"__pycache__"}:
            source = Path(distribution.locate_file(top))
            if not (directory / top).exists() and (source.is_dir() or source.suffix in (".py", ".so")):
                (directory / top).symlink_to(source)
    return directory


def run_runtime_only(site: Path, code: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -S -c code args` seeing only `flair_hf` and the runtime's distributions (linked into `site`, the
    interpreter's PYTHONPATH); output captured as text."""
    runtime_only_path(site)
    environment = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, "-S", "-c", code, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def load_backends(model_dir: Path, exports: dict[str, Path]) -> dict:
    backends = {"pytorch": FlairModel.from_pretrained(model_dir).eval()}
    for name, directory in exports.items():
        backends[name] = FlairOnnxModel.from_pretrained(directory)
    return backends


def workloads(backend, inputs: dict) -> dict:
    """The three timed calls of one backend on the shared inputs."""
    if isinstance(backend, FlairModel):
        ids, pixels = torch.from_numpy(inputs["ids"]), torch.from_numpy(inputs["pixels"])
        text_embeds, tokens = (torch.from_numpy(inputs[k]) for k in ("text_embeds", "image_token_embeds"))

        def pairs():
            return flair_cosine(backend.get_text_conditioned_image_features(text_embeds, tokens), text_embeds)

        return {"image": lambda: backend.get_image_and_token_features(pixels), "text": lambda: backend.get_text_embeds(ids), "pair": pairs}
    return {
        "image": lambda: backend.pixel_features(inputs["pixels"]),
        "text": lambda: backend.embed_token_ids(inputs["id_lists"]),
        "pair": lambda: backend.flair_cosines(inputs["text_embeds"], inputs["image_token_embeds"]),
    }


def make_inputs(model: FlairModel, images: int, texts: int, pair_images: int, pair_texts: int) -> dict:
    ids = caption_ids(texts, "flair")
    generator = torch.Generator().manual_seed(1)
    size = model.config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=generator)
    with torch.no_grad():
        tokens = model.get_image_token_features(torch.randn(pair_images, 3, size, size, generator=generator))
        text_embeds = model.get_text_embeds(caption_ids(pair_texts, "flair", seed=2))
    id_lists = ids_up_to_end_of_text(ids.numpy())
    return {"ids": ids.numpy(), "id_lists": id_lists, "pixels": pixels.numpy(), "text_embeds": text_embeds.numpy(),
            "image_token_embeds": tokens.numpy()}  # fmt: skip


def flops(model: FlairModel, inputs: dict) -> dict:
    """FLOPs of each workload as PyTorch executes it (the work-equivalent count for every backend)."""
    counts = {}
    for name, call in workloads(model, inputs).items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        counts[name] = counter.get_total_flops()
    return counts


def time_interleaved(backends: dict, inputs: dict, rounds: int) -> dict:
    """Median seconds of each (backend, workload) over `rounds` interleaved rounds after one warm-up."""
    calls = {(name, w): call for name, backend in backends.items() for w, call in workloads(backend, inputs).items()}
    with torch.inference_mode():
        times, _ = interleaved_times(calls, rounds)
    medians = {name: {} for name in backends}
    for (name, w), seconds in times.items():
        medians[name][w] = statistics.median(seconds)
    return medians


def drift(backends: dict, inputs: dict) -> dict:
    """int8 against fp32 ONNX: embedding cosines, max FLAIR logit difference, top-1 caption agreement per image."""
    models = backends["onnx-fp32"], backends["onnx-int8"]
    text = [m.embed_token_ids(inputs["id_lists"]) for m in models]
    image = [m.pixel_features(inputs["pixels"]) for m in models]
    logits = [m.flair_logits(t, i[1]) for m, t, i in zip(models, text, image)]
    return {
        "text_embedding_cosine_min": float(embedding_cosines(*text).min()),
        "image_embedding_cosine_min": float(embedding_cosines(image[0][0], image[1][0]).min()),
        "flair_logit_max_abs_difference": float(np.abs(logits[0] - logits[1]).max()),
        "top1_caption_agreement": float((logits[0].argmax(-1) == logits[1].argmax(-1)).mean()),
    }


def probe_peak_memory(backend: str, directory: Path, inputs_path: Path) -> float:
    """Peak RSS (MiB) of a fresh process that loads `backend` and runs each workload once."""
    code = "import sys; from flair_hf_benchmarks.benchmark_onnx import probe; probe(sys.argv[1], sys.argv[2])"
    with tempfile.TemporaryDirectory(prefix="flair-onnx-site-") as site:
        if backend == "pytorch":
            command = [sys.executable, "-c", code, str(directory), str(inputs_path)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        else:  # the deployment: flair_hf.onnx and its runtime only
            result = run_runtime_only(Path(site), RUNTIME_PROBE, str(directory), str(inputs_path))
    if result.returncode:
        raise RuntimeError(f"the {backend} memory probe failed:\n{result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


# the ONNX Runtime probe, runnable without torch: load, run the three workloads once, print the peak RSS in MiB
RUNTIME_PROBE = inspect.getsource(peak_rss_mib) + """
import sys, numpy as np
from flair_hf.onnx import FlairOnnxModel, ids_up_to_end_of_text
assert "torch" not in sys.modules and "transformers" not in sys.modules
m = FlairOnnxModel.from_pretrained(sys.argv[1])
inputs = dict(np.load(sys.argv[2], allow_pickle=False))
m.pixel_features(inputs["pixels"])
m.embed_token_ids(ids_up_to_end_of_text(inputs["ids"]))
m.flair_cosines(inputs["text_embeds"], inputs["image_token_embeds"])
assert "torch" not in sys.modules
print(peak_rss_mib())
"""


def probe(directory: str, inputs_path: str) -> None:
    """The PyTorch memory probe (run in a fresh process)."""
    model = FlairModel.from_pretrained(directory).eval()
    inputs = dict(np.load(inputs_path, allow_pickle=False))
    inputs["id_lists"] = None
    with torch.inference_mode():
        for call in workloads(model, inputs).values():
            call()
    print(peak_rss_mib())


def prepare_model(model_dir: str | None, work: Path) -> Path:
    """`model_dir`, or ViT-B-16-FLAIR with seeded random weights saved with the processor into `work`."""
    if model_dir:
        return Path(model_dir)
    torch.manual_seed(0)
    directory = work / "model"
    FlairModel(FlairConfig()).save_pretrained(directory)
    build_processor().save_pretrained(directory)
    return directory


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a converted model (default: ViT-B-16-FLAIR, seeded random weights)")
    parser.add_argument("--images", type=int, default=16, help="images per image-encoding call")
    parser.add_argument("--texts", type=int, default=256, help="texts per text-encoding call (FLAIR caption lengths)")
    parser.add_argument("--pair-images", type=int, default=16)
    parser.add_argument("--pair-texts", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/onnx-cpu.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flair-onnx-bench-") as work:
        work = Path(work)
        model_dir = prepare_model(args.model_dir, work)
        exports = {"onnx-fp32": work / "fp32", "onnx-int8": work / "int8"}
        export(model_dir, exports["onnx-fp32"])
        export(model_dir, exports["onnx-int8"], quantize="int8")
        backends = load_backends(model_dir, exports)
        inputs = make_inputs(backends["pytorch"], args.images, args.texts, args.pair_images, args.pair_texts)
        counts = flops(backends["pytorch"], inputs)
        peak = matmul_peak_flops() / 1e9
        seconds = time_interleaved(backends, inputs, args.rounds)
        inputs_path = work / "inputs.npz"
        np.savez(inputs_path, **{k: v for k, v in inputs.items() if k != "id_lists"})
        memory = {name: probe_peak_memory(name, model_dir if name == "pytorch" else exports[name], inputs_path) for name in BACKENDS}
        drifts = drift(backends, inputs)
    items = {"image": args.images, "text": args.texts, "pair": args.pair_images * args.pair_texts}
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "matmul_peak_gflops": peak},
        "versions": {"torch": torch.__version__, "onnxruntime": importlib.metadata.version("onnxruntime")},
        "model": Path(args.model_dir).name if args.model_dir else "ViT-B-16-FLAIR, seeded random weights",
        "items_per_call": items,
        "backends": {
            name: {
                w: {"items_per_second": items[w] / s, "seconds": s, "fraction_of_matmul_peak": counts[w] / s / 1e9 / peak,
                    "speedup_vs_pytorch": seconds["pytorch"][w] / s}  # fmt: skip
                for w, s in seconds[name].items()
            } | {"peak_memory_mib": memory[name]}
            for name in BACKENDS
        },
        "int8_drift": drifts,
    }
    print(f"{'backend':<10} {'image/s':>9} {'x':>6} {'text/s':>9} {'x':>6} {'pairs/s':>10} {'x':>6} {'peak MiB':>9}")
    for name, r in results["backends"].items():
        print(f"{name:<10} {r['image']['items_per_second']:>9.2f} {r['image']['speedup_vs_pytorch']:>6.2f} "
              f"{r['text']['items_per_second']:>9.1f} {r['text']['speedup_vs_pytorch']:>6.2f} "
              f"{r['pair']['items_per_second']:>10.0f} {r['pair']['speedup_vs_pytorch']:>6.2f} {r['peak_memory_mib']:>9.0f}")  # fmt: skip
    print("int8 drift:", json.dumps(drifts))
    print(f"wrote {write_json(results, args.output)}")
    return results


if __name__ == "__main__":
    main()
