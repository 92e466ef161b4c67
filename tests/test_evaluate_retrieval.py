"""End-to-end retrieval evaluation with the tiny model on tiny benchmark layouts."""

import json

import numpy as np
import pytest
import torch

from benchmark_layouts import build_data_root

from flair_hf_benchmarks import evaluate_retrieval

from flair_hf.evaluation import flatten_captions, retrieval_metrics  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_data_root(tmp_path_factory.mktemp("eval-data"))


def run(tiny_dir, data_root, tmp_path, *extra):
    output = tmp_path / "results.json"
    args = ["--model", str(tiny_dir), "--data-root", str(data_root), "--output", str(output), "--batch-size", "4"]
    results = evaluate_retrieval.main(args + list(extra))
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    return results


def test_flair_mode_end_to_end_matches_direct_model_scores(tiny_dir, tiny_model, data_root, tmp_path, capsys):
    results = run(tiny_dir, data_root, tmp_path, "--benchmark", "coco", "--benchmark", "iiw-long", "--mode", "flair")
    assert [r["benchmark"] for r in results] == ["coco", "iiw-long"]
    coco = results[0]
    assert (coco["num_images"], coco["num_texts"]) == (3, 15)
    assert coco["model_revision"].startswith("local-") and coco["timings"]["score_seconds"] >= 0
    # independent: the model's own FLAIR logits over the same pairs, ranked by the metric
    from flair_hf import FlairProcessor
    from flair_hf.retrieval_data import load_benchmark

    dataset = load_benchmark("coco", data_root)
    captions, text_to_image = flatten_captions(dataset)
    processor = FlairProcessor.from_pretrained(tiny_dir)
    inputs = processor(text=captions, images=list(dataset["image"]))
    with torch.no_grad():
        logits = tiny_model.get_logits(inputs["input_ids"], inputs["pixel_values"])[1].numpy()
    expected = retrieval_metrics(logits, text_to_image)
    for key, value in expected.items():
        assert coco["metrics"][key] == pytest.approx(value), key
    table = capsys.readouterr().out
    assert "| coco | flair |" in table and "| iiw-long | flair |" in table


def test_modes_share_cached_features(tiny_dir, data_root, tmp_path):
    cache = tmp_path / "cache"
    first = run(tiny_dir, data_root, tmp_path, "--benchmark", "flickr30k", "--mode", "global", "--cache-dir", str(cache))[0]
    assert first["timings"]["cached_features"] is False and len(list(cache.glob("*.safetensors"))) == 1
    topk = run(tiny_dir, data_root, tmp_path, "--benchmark", "flickr30k", "--mode", "topk", "--topk", "2", "--cache-dir", str(cache))[0]
    flair = run(tiny_dir, data_root, tmp_path, "--benchmark", "flickr30k", "--mode", "flair", "--cache-dir", str(cache))[0]
    assert topk["timings"]["cached_features"] is True and flair["timings"]["cached_features"] is True
    assert topk["topk"] == 2 and first["metrics"]["num_texts"] == 15
    # top-k with k >= number of images re-scores everything: identical to flair mode
    full = run(tiny_dir, data_root, tmp_path, "--benchmark", "flickr30k", "--mode", "topk", "--topk", "15", "--cache-dir", str(cache))[0]
    assert full["metrics"] == flair["metrics"]


def test_compare_paper_prints_published_numbers_only_for_the_papers_sets(tiny_dir, data_root, tmp_path, capsys, monkeypatch):
    run(tiny_dir, data_root, tmp_path, "--benchmark", "coco", "--mode", "global", "--compare-paper")
    assert "is not named after a released checkpoint" in capsys.readouterr().out  # the tiny model is no release
    monkeypatch.setattr(evaluate_retrieval, "paper_numbers", lambda model_id: evaluate_retrieval.PAPER_R1["flair-cc3m-recap"])
    run(tiny_dir, data_root, tmp_path, "--benchmark", "coco", "--mode", "global", "--compare-paper")
    assert "not comparable: the paper's set has 5000 images / 25014 texts, this one 3 / 15" in capsys.readouterr().out
    monkeypatch.setitem(evaluate_retrieval.PAPER_SET_SIZES, "coco", (3, 15))
    run(tiny_dir, data_root, tmp_path, "--benchmark", "coco", "--mode", "global", "--compare-paper")
    assert "| coco (paper) | flair | 37.7 | | | 51.6 | | |" in capsys.readouterr().out


def test_missing_data_root_is_a_usage_error(tiny_dir):
    with pytest.raises(SystemExit):
        evaluate_retrieval.main(["--model", str(tiny_dir), "--benchmark", "coco"])


def test_flatten_captions_orders_by_caption_id():
    dataset = {"captions": [["b", "d"], ["a", "c"]], "caption_ids": [[1, 3], [0, 2]]}
    captions, owners = flatten_captions(dataset)
    assert captions == ["a", "b", "c", "d"] and owners.tolist() == [1, 0, 1, 0]
    assert isinstance(owners, np.ndarray)


def test_user_errors_are_one_clear_line(tiny_dir, data_root, tmp_path, capsys):
    import json as json_module
    import shutil

    with pytest.raises(SystemExit):
        evaluate_retrieval.main(["--model", str(tmp_path / "no-such-model"), "--benchmark", "coco", "--data-root", str(data_root)])
    assert "no such directory, and not a Hub repo id" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: coco: missing annotation file"):
        evaluate_retrieval.main(["--model", str(tiny_dir), "--benchmark", "coco", "--data-root", str(tmp_path)])
    broken = tmp_path / "broken"
    shutil.copytree(data_root / "coco", broken / "coco")
    annotations = broken / "coco" / "annotations" / "captions_val2017.json"
    data = json_module.loads(annotations.read_text())
    data["annotations"][0]["image_id"] = 999
    annotations.write_text(json_module.dumps(data))
    with pytest.raises(SystemExit, match="refers to image_id 999, which is not among the file's images"):
        evaluate_retrieval.main(["--model", str(tiny_dir), "--benchmark", "coco", "--data-root", str(broken)])


def test_markdown_next_to_json_rounded_recalls_and_defaults_in_help(tiny_dir, data_root, tmp_path, capsys):
    results = run(tiny_dir, data_root, tmp_path, "--benchmark", "coco", "--benchmark", "coco", "--mode", "global")
    assert len(results) == 1  # the same benchmark twice runs once
    assert (tmp_path / "results.md").read_text().startswith("| benchmark | mode |")
    assert all(value == round(value, 4) for key, value in results[0]["metrics"].items() if "_R@" in key)
    with pytest.raises(SystemExit):
        evaluate_retrieval.main(["--help"])
    assert "(default: flair)" in capsys.readouterr().out


def test_cache_is_keyed_on_image_contents_and_weights(tiny_dir, data_root, tmp_path, capsys):
    import os
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(data_root / "flickr30k-images", root / "flickr30k-images")
    cache = tmp_path / "cache"
    first = run(tiny_dir, root, tmp_path, "--benchmark", "flickr30k", "--mode", "global", "--cache-dir", str(cache))[0]
    assert "flickr30k: feature cache written" in capsys.readouterr().out
    again = run(tiny_dir, root, tmp_path, "--benchmark", "flickr30k", "--mode", "global", "--cache-dir", str(cache))[0]
    assert again["timings"]["cached_features"] is True and "feature cache hit" in capsys.readouterr().out
    # an image replaced in place, with its old modification time: new content -> new features, not the stale ones
    image = sorted((root / "flickr30k-images").glob("*.jpg"))[0]
    stat = image.stat()
    Image.fromarray(np.full((24, 32, 3), 200, dtype=np.uint8)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = run(tiny_dir, root, tmp_path, "--benchmark", "flickr30k", "--mode", "global", "--cache-dir", str(cache))[0]
    assert changed["timings"]["cached_features"] is False and len(list(cache.glob("*.safetensors"))) == 2
    # another local model (same file names, other weights) never shares entries
    other = tmp_path / "other-model"
    shutil.copytree(tiny_dir, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    weights["logit_scale"] = weights["logit_scale"] + 1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    result = evaluate_retrieval.main(["--model", str(other), "--benchmark", "flickr30k", "--data-root", str(root), "--mode",
                                      "global", "--cache-dir", str(cache), "--output", str(tmp_path / "o.json")])[0]  # fmt: skip
    assert result["timings"]["cached_features"] is False and result["model_revision"] != first["model_revision"]
