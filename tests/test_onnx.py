"""ONNX Runtime deployment: `conversion/export_onnx.py` and `flair_hf.onnx.FlairOnnxModel` against PyTorch
(`FlairScorer`), on the tiny model and the full-size ViT-B/16 (manifest weights); int8 drift within measured bounds;
the runtime in an interpreter where torch and transformers are not installed."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from PIL import Image
import pytest
import torch

from conftest import FIXTURES, ROOT
from manual import bash_commands, code_blocks, run_command, run_python, section, workdir
from flair_hf.onnx import FlairOnnxModel, quantized_name
from flair_hf_benchmarks.benchmark_onnx import run_runtime_only
from flair_hf_conversion import export_onnx

IMAGES = sorted(str(p) for p in (FIXTURES / "images").iterdir())
# lengths from 2 tokens ("") to past the context (truncated), in an order that is not sorted by length
TEXTS = [
    "a photo of a dog",
    "",
    "In the image, a small white puppy with black ears and eyes is the main subject, " * 6,
    "A red ladybug is surrounded by green glass beads",
    "two",
]
# int8 against fp32 on the full-size manifest model and these inputs, measured: embedding
# cosines >= 0.9994, FLAIR logits within 0.048, the same top-1 caption for every image; bounds with margin
INT8_MIN_COSINE, INT8_MAX_LOGIT_DIFFERENCE, INT8_MIN_TOP1_AGREEMENT = 0.998, 0.15, 5 / 6


@pytest.fixture(scope="module")
def full_onnx(full_size_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("onnx") / "full-onnx"
    export_onnx.export(full_size_dir, output)
    return output


def assert_scores_equal(scorer, exported: FlairOnnxModel, images, texts, tolerance: float) -> None:
    expected, got = scorer.score(images, texts), exported.score(images, texts)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value.numpy(), atol=tolerance, rtol=0, err_msg=key)
    np.testing.assert_allclose(exported.encode_text(texts), scorer.encode_text(texts).numpy(), atol=tolerance, rtol=0)
    np.testing.assert_allclose(exported.encode_image(images), scorer.encode_image(images).numpy(), atol=tolerance, rtol=0)


def test_export_writes_the_graphs_the_processor_and_a_shareable_manifest(tiny_onnx, tiny_dir):
    manifest = json.loads((tiny_onnx / "flair_onnx.json").read_text())
    for file in manifest["graphs"].values():
        onnx.checker.check_model(str(tiny_onnx / file))
        graph = (tiny_onnx / file).read_bytes()
        assert str(ROOT).encode() not in graph and b"site-packages" not in graph, file  # no local paths in what is shared
    assert {"tokenizer.json", "processor_config.json"} <= {p.name for p in tiny_onnx.iterdir()}
    assert manifest["source"]["model"] == tiny_dir.name and str(tiny_dir.parent) not in json.dumps(manifest)
    assert manifest["quantization"] is None and manifest["int8_vs_pytorch"] is None
    assert max(manifest["fp32_vs_pytorch"]["max_abs_difference"].values()) < 1e-4
    assert min(manifest["fp32_vs_pytorch"]["embedding_cosine_min"].values()) > 0.99999
    assert manifest["logit_scale"] == pytest.approx(10.0) and manifest["logit_bias"] == pytest.approx(-2.5)


@pytest.mark.parametrize("images, texts", [(IMAGES, TEXTS), (IMAGES[:1], TEXTS[:1]), (IMAGES[2:5], TEXTS[::-1] * 3)])
def test_tiny_onnx_equals_pytorch_at_other_batch_sizes_and_lengths(tiny_onnx, tiny_scorer, images, texts):
    assert_scores_equal(tiny_scorer, FlairOnnxModel.from_pretrained(tiny_onnx), images, texts, tolerance=1e-4)


def test_full_size_onnx_equals_pytorch(full_onnx, full_size_dir):
    from flair_hf import FlairScorer

    assert_scores_equal(FlairScorer.from_pretrained(full_size_dir), FlairOnnxModel.from_pretrained(full_onnx), IMAGES, TEXTS, 1e-4)


def test_runtime_tokens_and_pixels_equal_the_processor(tiny_onnx, tiny_scorer):
    cases = json.loads((FIXTURES / "tokenizer_cases.json").read_text())["cases"]
    exported = FlairOnnxModel.from_pretrained(tiny_onnx)
    assert exported.token_ids([c["text"] for c in cases]) == [c["input_ids"] for c in cases]  # the original's ids
    expected = tiny_scorer.processor(images=IMAGES)["pixel_values"].numpy()
    assert np.array_equal(exported.pixel_values(IMAGES), expected)


def test_runtime_needs_neither_torch_nor_transformers(tiny_onnx, tiny_scorer, tmp_path):
    code = """
import json, sys
from flair_hf.onnx import FlairOnnxModel
scores = FlairOnnxModel.from_pretrained(sys.argv[1]).score(json.loads(sys.argv[2]), json.loads(sys.argv[3]))
print(json.dumps({"logits": scores["logits"].tolist(), "imported": [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]}))
"""
    result = run_runtime_only(tmp_path / "site", "import torch", timeout=60)
    assert result.returncode and "No module named 'torch'" in result.stderr  # the interpreter has no torch at all
    result = run_runtime_only(tmp_path / "site", code, str(tiny_onnx), json.dumps(IMAGES), json.dumps(TEXTS), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout)
    assert output["imported"] == []
    np.testing.assert_allclose(output["logits"], tiny_scorer.score(IMAGES, TEXTS)["logits"].numpy(), atol=1e-4)


def test_runtime_imports_no_torch_where_torch_is_installed_and_pytorch_classes_register_on_first_use(tiny_onnx, tiny_dir, tmp_path):
    code = """
import json, sys
import flair_hf
from flair_hf.onnx import FlairOnnxModel
FlairOnnxModel.from_pretrained(sys.argv[1]).encode_text(["a dog"])
light = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
from transformers import AutoConfig, AutoModel
try:
    AutoConfig.from_pretrained(sys.argv[2], trust_remote_code=False)
    known_before = True
except ValueError:
    known_before = False
from flair_hf.modeling_flair import FlairModel  # a submodule: no registration, but save_pretrained writes remote code
FlairModel.from_pretrained(sys.argv[2]).save_pretrained(sys.argv[3])
saved = sorted(json.load(open(sys.argv[3] + "/config.json"))["auto_map"])
from flair_hf import FlairProcessor
model = AutoModel.from_pretrained(sys.argv[2], trust_remote_code=False)
print(json.dumps({"light": light, "known_before": known_before, "auto_map": saved, "model": type(model).__module__}))
"""
    command = [sys.executable, "-c", code, str(tiny_onnx), str(tiny_dir), str(tmp_path / "saved")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "light": [], "known_before": False, "model": "flair_hf.modeling_flair",
        "auto_map": ["AutoConfig", "AutoModel", "AutoModelForZeroShotImageClassification"],
    }  # fmt: skip


def test_int8_quantizes_the_matmuls_and_drifts_within_measured_bounds(full_onnx, tmp_path):
    int8_dir = tmp_path / "int8"
    shutil.copytree(full_onnx, int8_dir)
    export_onnx.quantize_int8(int8_dir)
    ops = {node.op_type for node in onnx.load(str(int8_dir / "onnx" / "vision_model_quantized.onnx")).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}, ops
    manifest = json.loads((int8_dir / "flair_onnx.json").read_text())
    manifest["quantized_graphs"] = {name: quantized_name(file) for name, file in manifest["graphs"].items()}
    (int8_dir / "flair_onnx.json").write_text(json.dumps(manifest))
    fp32, int8 = FlairOnnxModel.from_pretrained(full_onnx), FlairOnnxModel.from_pretrained(int8_dir)
    assert FlairOnnxModel.from_pretrained(int8_dir, precision="fp32").encode_text(TEXTS).tolist() == fp32.encode_text(TEXTS).tolist()
    with pytest.raises(ValueError, match="no int8 graphs: export it with --quantize int8"):
        FlairOnnxModel.from_pretrained(full_onnx, precision="int8")
    for encode, items in (("encode_text", TEXTS), ("encode_image", IMAGES)):
        cosines = (getattr(fp32, encode)(items) * getattr(int8, encode)(items)).sum(-1)
        assert cosines.min() > INT8_MIN_COSINE, (encode, cosines)
    logits = [model.score(IMAGES, TEXTS)["logits"] for model in (fp32, int8)]
    assert 0 < np.abs(logits[0] - logits[1]).max() < INT8_MAX_LOGIT_DIFFERENCE
    assert (logits[0].argmax(1) == logits[1].argmax(1)).mean() >= INT8_MIN_TOP1_AGREEMENT


def test_deploying_commands_and_example_run_as_written(tmp_path):
    """The Deployment page's export commands and its Python, as written, on the bundled model."""
    text = section("deployment.md", "Deploying with ONNX Runtime")
    commands = [line for line in bash_commands(text) if line.startswith("python ")]
    assert len(commands) == 2 and commands[1].endswith("--quantize int8")
    work = workdir(tmp_path)
    for command in commands:
        assert "exported" in run_command(command, work).stdout
    manifests = [json.loads((work / "out" / name / "flair_onnx.json").read_text()) for name in ("flair-onnx", "flair-onnx-int8")]
    assert [m["quantization"] for m in manifests] == [None, "int8-dynamic"]
    assert manifests[0]["int8_vs_pytorch"] is None and min(manifests[1]["int8_vs_pytorch"]["embedding_cosine_min"].values()) > 0.99
    out = run_python("\n".join(code_blocks(text, "python")), tmp_path, cwd=work)
    probs = [float(x) for x in re.findall(r"\d+\.\d*(?:e[-+]?\d+)?", out)]  # the printed (1, 2) array
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-4 and probs[0] > probs[1], out  # the dress is in the mosaic


@pytest.mark.parametrize(
    "bound, value, extra, message",
    [("CHECK_TOLERANCE", 0.0, [], "differ from PyTorch"), ("INT8_MIN_EMBEDDING_COSINE", 1.01, ["--quantize", "int8"], "int8 graphs' embeddings drift"),
     ("INT8_MAX_COSINE_DIFFERENCE", -1.0, ["--quantize", "int8"], "pair graph's FLAIR cosines differ")],
)  # fmt: skip
def test_export_checks_against_pytorch_before_anything_is_written(tiny_dir, tmp_path, monkeypatch, capsys, bound, value, extra, message):
    monkeypatch.setattr(export_onnx, bound, value)
    assert export_onnx.main([str(tiny_dir), str(tmp_path / "out"), *extra]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory left


def test_export_refuses_a_non_empty_output_and_a_directory_that_is_not_a_model(tiny_onnx, tmp_path, capsys):
    assert export_onnx.main([str(tmp_path), str(tiny_onnx)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert export_onnx.main([str(tmp_path), str(tmp_path / "out")]) == 1
    assert "cannot load a FLAIR model" in capsys.readouterr().err


def test_runtime_errors_name_the_problem(tiny_onnx, tiny_dir, monkeypatch):
    exported = FlairOnnxModel.from_pretrained(tiny_onnx)
    with pytest.raises(ValueError, match="0 images and 1 texts"):
        exported.score([], "a dog")
    with pytest.raises(ValueError, match="1 images and 0 texts"):
        exported.score(IMAGES[0], [])
    with pytest.raises(ValueError, match=r"pass uint8 \(0-255\) or floats in \[0, 1\]"):
        exported.encode_image(np.full((4, 4, 3), 2.5, dtype=np.float32))
    with pytest.raises(TypeError, match="pass a PIL image, a file path or a NumPy array"):
        exported.encode_image([{"not": "an image"}])
    with pytest.raises(FileNotFoundError, match="export a model first"):
        FlairOnnxModel.from_pretrained(tiny_dir)
    from flair_hf.retrieval import flair_scores

    with pytest.raises(ValueError, match="precision it was exported in"):
        flair_scores(exported, torch.zeros(1, 32), torch.zeros(1, 196, 32), autocast_dtype=torch.bfloat16)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        FlairOnnxModel.from_pretrained(str(tiny_onnx) + "-typo")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the variable alone is too late
    with pytest.raises(OSError, match="not a local directory"):
        FlairOnnxModel.from_pretrained("nobody/no-such-flair-onnx")


@pytest.mark.parametrize("shape, dtype", [((50, 70, 3), "uint8"), ((3, 50, 70), "uint8"), ((50, 70, 1), "uint8"),
                                          ((50, 70, 4), "uint8"), ((50, 70), "uint8"), ((3, 50, 70), "float32")])  # fmt: skip
def test_onnx_on_one_array_image_equals_pytorch(tiny_onnx, tiny_scorer, shape, dtype):
    """Gray, RGB and RGBA arrays, channels last or first, uint8 or floats in [0, 1], as the PyTorch processor reads them."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(shape, generator=generator) if dtype == "float32" else torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    array = np.asarray(pixels)
    assert_scores_equal(tiny_scorer, FlairOnnxModel.from_pretrained(tiny_onnx), array, "a dog", tolerance=1e-4)


def test_one_string_and_one_path_are_one_item(tiny_onnx):
    exported = FlairOnnxModel.from_pretrained(tiny_onnx)
    assert exported.token_ids("a dog") == exported.token_ids(["a dog"]) and len(exported.token_ids("a dog")) == 1
    assert exported.pixel_values(IMAGES[0]).shape == (1, 3, 224, 224)


def test_blocks_and_batches_smaller_than_the_inputs_give_the_same_scores(tiny_onnx, tiny_scorer):
    exported = FlairOnnxModel.from_pretrained(tiny_onnx)
    exported.manifest["pair_chunk_sizes"] = [2, 3]  # 6 images x 15 texts: 3 x 5 blocks, the last ones partial
    texts = TEXTS * 3
    expected = tiny_scorer.score(IMAGES, texts)["logits"].numpy()
    text_embeds = exported.text_embeds(texts, batch_size=4)
    tokens = exported.image_features(IMAGES, batch_size=4)[1]
    np.testing.assert_allclose(exported.flair_logits(text_embeds, tokens), expected, atol=1e-4, rtol=0)
    attention = exported.attention_maps(text_embeds, tokens)
    whole = FlairOnnxModel.from_pretrained(tiny_onnx).attention_maps(text_embeds, tokens)
    assert attention.shape == (6, 15, 196) and np.array_equal(attention, whole)


def test_benchmark_onnx_runs_at_small_scale(tiny_dir, tmp_path):
    from flair_hf_benchmarks import benchmark_onnx

    output = tmp_path / "onnx.json"
    results = benchmark_onnx.main(["--model-dir", str(tiny_dir), "--images", "2", "--texts", "8", "--pair-images", "2",
                                   "--pair-texts", "8", "--rounds", "1", "--output", str(output)])  # fmt: skip
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    for backend in benchmark_onnx.BACKENDS:
        row = results["backends"][backend]
        assert row["peak_memory_mib"] > 0 and all(row[w]["items_per_second"] > 0 for w in ("image", "text", "pair"))
    assert results["backends"]["onnx-fp32"]["peak_memory_mib"] < results["backends"]["pytorch"]["peak_memory_mib"]
    assert results["int8_drift"]["top1_caption_agreement"] >= 0.5
    assert Path(str(tiny_dir)).name in results["model"]


def test_retrieval_and_classification_clis_take_an_export_and_agree_with_pytorch(tiny_onnx, tiny_dir, tmp_path):
    from benchmark_layouts import build_data_root

    from flair_hf_benchmarks import evaluate_classification, evaluate_retrieval

    data_root = build_data_root(tmp_path / "retrieval")
    for mode in ("flair", "topk"):
        runs = [evaluate_retrieval.main(["--model", str(model), "--data-root", str(data_root), "--benchmark", "coco", "--mode", mode,
                                         "--topk", "2", "--output", str(tmp_path / f"{mode}.json")])[0]  # fmt: skip
                for model in (tiny_dir, tiny_onnx)]
        assert runs[0]["metrics"] == runs[1]["metrics"] and runs[0]["model_revision"] != runs[1]["model_revision"], mode
    images = tmp_path / "classes"
    for c, name in enumerate(("golden_retriever", "sports_car", "tree")):
        (images / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.random.default_rng(10 * c + i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / name / f"{i}.png")
    runs = [evaluate_classification.main(["--model", str(model), "--data-root", str(images), "--output", str(tmp_path / "c.json")])
            for model in (tiny_dir, tiny_onnx)]  # fmt: skip
    assert runs[0]["accuracy"] == runs[1]["accuracy"]


@pytest.mark.parametrize("method", ["similarity", "attention"])
def test_segmentation_cli_on_an_export_equals_pytorch(tiny_onnx, tiny_dir, tmp_path, method):
    from segmentation_layouts import build_segmentation_root

    from flair_hf_benchmarks import evaluate_segmentation

    root = build_segmentation_root(tmp_path / "data")
    args = ["--benchmark", "voc20", "--data-root", str(root), "--method", method, "--output", str(tmp_path / "s.json")]
    runs = [evaluate_segmentation.main(["--model", str(model), *args])[0] for model in (tiny_dir, tiny_onnx)]
    for run in runs:
        del run["seconds"], run["model"]
    assert runs[0] == runs[1]
    with pytest.raises(SystemExit, match="takes 224x224 windows only: use --crop 224"):
        evaluate_segmentation.main(["--model", str(tiny_onnx), *args, "--crop", "112"])

def test_encode_in_batches_with_progress_bars_equals_the_scorer(tiny_onnx, tiny_scorer, capsys):
    exported = FlairOnnxModel.from_pretrained(tiny_onnx)
    texts = exported.encode_text(TEXTS * 3, batch_size=4, show_progress_bar=True)
    images = exported.encode_image(IMAGES, batch_size=4, show_progress_bar=True)
    progress = capsys.readouterr().err
    assert "encoding texts" in progress and "encoding images" in progress
    np.testing.assert_allclose(texts, tiny_scorer.encode_text(TEXTS * 3).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(images, tiny_scorer.encode_image(IMAGES).numpy(), atol=1e-5, rtol=0)
    assert "encoding" not in (exported.encode_text(TEXTS), capsys.readouterr().err)[1]


def test_graphs_load_on_first_use_and_an_incomplete_export_is_refused(tiny_onnx, tmp_path):
    exported = FlairOnnxModel.from_pretrained(tiny_onnx)
    assert len(exported.sessions) == 0
    exported.encode_text("a dog")
    assert list(exported.sessions) == ["text"]
    partial = tmp_path / "partial"
    shutil.copytree(tiny_onnx, partial)
    (partial / "onnx" / "pair_attention.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="lacks the attention graph"):
        FlairOnnxModel.from_pretrained(partial)
    config = json.loads((partial / "preprocessor_config.json").read_text())  # read first, as transformers.js reads it
    config["do_convert_rgb"] = False
    (partial / "preprocessor_config.json").write_text(json.dumps(config))
    shutil.copy(tiny_onnx / "onnx" / "pair_attention.onnx", partial / "onnx")
    with pytest.raises(ValueError, match="do_convert_rgb=False"):
        FlairOnnxModel.from_pretrained(partial)


def test_images_and_texts_from_generators_are_lists_for_both_backends(tiny_onnx, tiny_scorer):
    expected = tiny_scorer.score(IMAGES[:2], TEXTS[:2])["logits"].numpy()
    for scorer in (tiny_scorer, FlairOnnxModel.from_pretrained(tiny_onnx)):
        logits = np.asarray(scorer.score((i for i in IMAGES[:2]), (t for t in TEXTS[:2]))["logits"])
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
