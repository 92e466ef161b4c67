"""FlairScorer: encode_text / encode_image / score on strings, paths, PIL images and arrays, with a model of
flair_hf or one loaded through remote code."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FIXTURES

IMAGE = FIXTURES / "images" / "puppy.jpg"
TEXTS = ["a small white puppy", "a red car", "two football players"]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from flair_hf import FlairScorer

    scorer = FlairScorer.from_pretrained(tiny_dir)
    return scorer, scorer.processor


def test_encode_text_equals_normalised_features(loaded):
    scorer, processor = loaded
    model = scorer.model
    with torch.no_grad():
        expected = F.normalize(model.get_text_embeds(processor(text=TEXTS)["input_ids"]), dim=-1)
    torch.testing.assert_close(scorer.encode_text(TEXTS, batch_size=2, show_progress_bar=True), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(scorer.encode_text(TEXTS[0]), expected[:1], atol=1e-6, rtol=0)
    assert scorer.encode_text([]).shape == (0, model.config.projection_dim)


def test_encode_image_takes_paths_pil_and_arrays(loaded):
    scorer, processor = loaded
    model = scorer.model
    picture = Image.open(IMAGE)
    with torch.no_grad():
        expected = F.normalize(model.get_image_embeds(processor(images=[picture])["pixel_values"]), dim=-1)
    embeddings = scorer.encode_image([str(IMAGE), picture, np.asarray(picture.convert("RGB"))], batch_size=2)
    assert embeddings.shape == (3, model.config.projection_dim)
    for row in embeddings:
        torch.testing.assert_close(row[None], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not download images"):
        scorer.encode_image("https://example.com/cat.jpg")


def test_score_gives_flair_logits_and_probabilities(loaded):
    scorer, processor = loaded
    result = scorer.score(str(IMAGE), TEXTS)
    with torch.no_grad():
        logits = scorer.model(**processor(text=TEXTS, images=Image.open(IMAGE))).logits_per_image
    torch.testing.assert_close(result["logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(result["probs"], logits.softmax(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(result["sigmoid_probs"], torch.sigmoid(logits), atol=1e-6, rtol=0)


def test_a_remote_code_model_works_in_the_scorer(tiny_dir, loaded, tmp_path, monkeypatch):
    """FlairScorer around a model and processor loaded with trust_remote_code=True (the files saved beside the
    weights, not flair_hf's classes) gives the same embeddings and logits."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from flair_hf import FlairModel, FlairProcessor, FlairScorer

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    remote_classes = [get_class_from_dynamic_module(name, str(tiny_dir)) for name in ("modeling_flair.FlairModel", "processing_flair.FlairProcessor")]
    assert remote_classes[0] is not FlairModel and remote_classes[1] is not FlairProcessor
    remote = FlairScorer(remote_classes[0].from_pretrained(tiny_dir).eval(), remote_classes[1].from_pretrained(tiny_dir))
    scorer, _ = loaded
    torch.testing.assert_close(remote.encode_text(TEXTS), scorer.encode_text(TEXTS), atol=1e-6, rtol=0)
    torch.testing.assert_close(remote.score(str(IMAGE), TEXTS)["logits"], scorer.score(str(IMAGE), TEXTS)["logits"], atol=1e-5, rtol=0)


MODEL_FILES = ("modeling_flair.py", "configuration_flair.py", "loss.py")  # what FlairModel runs
NETWORK_OR_DYNAMIC_IMPORTS = {"urllib", "http", "socket", "requests", "httpx", "aiohttp", "subprocess", "huggingface_hub",
                              "pickle", "importlib", "ctypes", "multiprocessing"}  # fmt: skip
HARMLESS_SUBMODULES = {"huggingface_hub.dataclasses"}  # the config's field validation, no I/O
DYNAMIC_CALLS = {"exec", "eval", "compile", "__import__"}  # the builtins (called by name)
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "urlopen", "load", "save", "unlink", "remove",
              "mkdir", "rmtree", "system", "popen", "listdir", "iterdir", "glob", "scandir"}  # fmt: skip


def imported_and_called(path) -> tuple[set[str], set[str]]:
    """The top-level packages a source file imports (but `HARMLESS_SUBMODULES`) and the names it calls: `f` for
    `f(...)`, `.f` for `x.f(...)`."""
    import ast

    tree = ast.parse(path.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    imported = {module.split(".")[0] for module in modules - HARMLESS_SUBMODULES}
    calls = {node.func.id if isinstance(node.func, ast.Name) else "." + node.func.attr
             for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))}  # fmt: skip
    return imported, calls


def test_remote_code_touches_no_network_runs_no_dynamic_code_and_the_model_no_files(tiny_dir):
    """What `trust_remote_code=True` runs, read from the saved directory: no network, subprocess or pickle imports
    and no exec/eval in any file; the model's files (not the processor's, which opens image paths) call no file I/O."""
    from flair_hf import FlairModel

    remote_files = sorted(tiny_dir.glob("*.py"))
    assert {p.name for p in remote_files} >= set(MODEL_FILES)
    for path in remote_files:
        imported, calls = imported_and_called(path)
        assert not imported & NETWORK_OR_DYNAMIC_IMPORTS, (path.name, imported & NETWORK_OR_DYNAMIC_IMPORTS)
        assert not calls & DYNAMIC_CALLS, (path.name, calls & DYNAMIC_CALLS)
        if path.name in MODEL_FILES:
            assert not imported & {"PIL", "io", "os", "pathlib", "shutil", "tempfile"}, (path.name, imported)
            assert not {call.lstrip(".") for call in calls} & FILE_CALLS, (path.name, sorted(calls))
    assert not {"encode_text", "encode_image", "score", "_get_processor"} & set(dir(FlairModel))


def test_empty_inputs_are_one_line_errors(tiny_dir):
    from transformers import pipeline

    from flair_hf import FlairScorer

    scorer = FlairScorer.from_pretrained(tiny_dir)
    model = scorer.model
    image = str(FIXTURES / "images" / "puppy.jpg")
    with pytest.raises(ValueError, match=r"^score\(\) got 1 images and 0 texts: pass at least one of each$"):
        scorer.score(image, [])
    with pytest.raises(ValueError, match=r"^score\(\) got 0 images and 1 texts: pass at least one of each$"):
        scorer.score([], ["a puppy"])
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_dir))
    with pytest.raises(ValueError, match=r"^FlairTokenizer got an empty list of texts \(e.g. candidate_labels=\[\]\): pass at least one$"):
        classifier(image, candidate_labels=[])
    with pytest.raises(ValueError, match=r"^FlairModel got 0 images in pixel_values: pass at least one$"):
        model(input_ids=torch.ones(1, 77, dtype=torch.long), pixel_values=torch.zeros(0, 3, 32, 32))
