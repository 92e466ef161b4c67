"""The converter: bad inputs fail clearly and leave nothing behind; --verify; Hub download and upload paths."""


import pytest
import torch

from conftest import FIXTURES, TINY_OPEN_CLIP_CONFIG, converter
from flair_hf_conversion import hub, state_dict

TINY_STATE_DICT = FIXTURES / "tiny" / "flair-tiny-state-dict.pt"


@pytest.fixture(scope="module")
def tiny_tensors():
    return torch.load(TINY_STATE_DICT, weights_only=True)


def convert_tiny(source, output, **kwargs):
    return converter.convert(str(source), output, TINY_OPEN_CLIP_CONFIG, **kwargs)


def expect_failure(source, tmp_path, match):
    output = tmp_path / "out"
    with pytest.raises(state_dict.ConversionError, match=match):
        convert_tiny(source, output)
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


class Opaque:
    pass


def test_bad_files(tmp_path):
    data = TINY_STATE_DICT.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    expect_failure(tmp_path / "truncated.pt", tmp_path, "truncated.pt: not a readable PyTorch checkpoint")
    (tmp_path / "random.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    expect_failure(tmp_path / "random.pt", tmp_path, "random.pt: not a readable PyTorch checkpoint")
    torch.save({"state_dict": {"x": Opaque()}}, tmp_path / "pickle.pt")
    expect_failure(tmp_path / "pickle.pt", tmp_path, r"pickle.pt: refused by torch.load\(weights_only=True\)")
    expect_failure(tmp_path / "missing.pt", tmp_path, "missing.pt: no such file")


def test_state_dict_problems_name_the_key(tiny_tensors, tmp_path):
    missing = dict(tiny_tensors)
    del missing["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    torch.save(missing, tmp_path / "missing_key.pt")
    expect_failure(tmp_path / "missing_key.pt", tmp_path, r"missing keys: visual\.transformer\.resblocks\.1\.mlp\.c_fc\.bias")

    reshaped = dict(tiny_tensors)
    reshaped["text_post.proj"] = reshaped["text_post.proj"][:, :16].contiguous()
    torch.save(reshaped, tmp_path / "reshaped.pt")
    expect_failure(tmp_path / "reshaped.pt", tmp_path, r"text_post\.proj: \(32, 16\), expected \(32, 32\)")

    extra = {**tiny_tensors, "visual.proj": torch.zeros(64, 32)}
    torch.save(extra, tmp_path / "extra.pt")
    expect_failure(tmp_path / "extra.pt", tmp_path, r"unexpected keys: visual\.proj")


def test_plain_clip_checkpoint_is_rejected(tiny_tensors, tmp_path):
    clip = {k: v for k, v in tiny_tensors.items() if not k.startswith(("visual_proj.", "image_post.", "text_post.", "logit_bias"))}
    clip["visual.proj"], clip["text_projection"] = tiny_tensors["image_post.proj"], tiny_tensors["text_post.proj"]
    torch.save(clip, tmp_path / "clip.pt")
    expect_failure(tmp_path / "clip.pt", tmp_path, "a plain CLIP checkpoint has no FLAIR pooling head")


def test_module_prefix_fp16_checkpoint_converts_and_verifies(tiny_tensors, tmp_path):
    half = {f"module.{k}": v.half() for k, v in tiny_tensors.items()}
    torch.save({"epoch": 1, "state_dict": half}, tmp_path / "half.pt")
    report = convert_tiny(tmp_path / "half.pt", tmp_path / "out", run_verify=True)
    assert max(report["max_abs_difference"].values()) <= 1e-4
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(state_dict.ConversionError, match="exists and is not empty"):
        convert_tiny(TINY_STATE_DICT, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_verify_catches_a_wrong_mapping(monkeypatch, tmp_path):
    original_split = state_dict._split_in_proj

    def swapped_q_k(tensors, source, target):
        converted = original_split(tensors, source, target)
        converted[f"{target}.q_proj.weight"], converted[f"{target}.k_proj.weight"] = (
            converted[f"{target}.k_proj.weight"], converted[f"{target}.q_proj.weight"],
        )  # fmt: skip
        return converted

    monkeypatch.setattr(state_dict, "_split_in_proj", swapped_q_k)
    with pytest.raises(state_dict.ConversionError, match="--verify failed"):
        convert_tiny(TINY_STATE_DICT, tmp_path / "out", run_verify=True)
    assert not (tmp_path / "out").exists()


def test_cli_exit_codes(tmp_path, capsys):
    args = [str(TINY_STATE_DICT), str(tmp_path / "cli"), "--verify", "--open-clip-config", str(FIXTURES / "tiny" / "open_clip_config.json")]
    assert converter.main(args) == 0
    assert "verified against the original forward" in capsys.readouterr().out
    assert converter.main(args) == 1
    assert "not empty" in capsys.readouterr().err


def test_released_name_offline_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(state_dict.ConversionError, match="could not download flair-cc3m-recap.pt from .*xiaorui638/flair.*local path"):
        converter.convert("flair-cc3m-recap", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_released_name_downloads_from_flair_repo(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(TINY_STATE_DICT)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    converter.convert("flair-merged30m", tmp_path / "out", TINY_OPEN_CLIP_CONFIG)
    assert calls == [("xiaorui638/flair", "flair-merged30m.pt")]


def test_push_to_hub_uploads_folder_with_model_card(monkeypatch, tmp_path, tiny_dir):
    import shutil

    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    hub.push_to_hub(folder, "me/flair-tiny", str(tmp_path / "private" / "flair-tiny.pt"), {"logits_per_image": 1e-6})
    assert calls[0] == ("create_repo", "me/flair-tiny", True)
    assert calls[1][0] == "upload_folder" and {"README.md", "model.safetensors", "modeling_flair.py"} <= set(calls[1][2])
    card = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in card and "1.00e-06" in card and "@inproceedings" in card
    assert "flair-tiny.pt" in card and str(tmp_path) not in card  # file name only, no local path


def test_converted_files_hold_no_local_paths(tiny_converted):
    """Nothing written for sharing names a path on this machine: the checkpoint is named by file name only."""
    import json

    from conftest import FIXTURES

    for directory in tiny_converted.values():
        parity = json.loads((directory / "conversion_parity.json").read_text())
        assert parity["source"] in ("flair-tiny-state-dict.pt", "flair-tiny-train-ckpt.pt")
        for path in directory.iterdir():
            if path.suffix in (".json", ".py", ".md", ".txt"):
                text = path.read_text()
                assert str(FIXTURES) not in text and str(directory) not in text and "/tmp/" not in text, path.name


def test_push_to_hub_offline_fails_clearly(monkeypatch, tmp_path, tiny_dir):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    with pytest.raises(state_dict.ConversionError, match="push to the Hub repository me/flair-tiny failed.*kept in"):
        hub.push_to_hub(folder, "me/flair-tiny", "flair-tiny.pt", None)


def test_every_manifest_key_is_mapped():
    import json

    manifest = json.loads((FIXTURES / "vit-b-16-flair-state-dict-manifest.json").read_text())
    config = state_dict.flair_config_from_open_clip(state_dict.VIT_B_16_FLAIR)
    expected = state_dict.original_shapes(config)
    assert [e["name"] for e in manifest["state_dict"]] == list(expected)
    assert all(tuple(e["shape"]) == expected[e["name"]] for e in manifest["state_dict"])
    tensors = {name: torch.zeros(shape) for name, shape in expected.items()}
    converted = state_dict.convert_state_dict(tensors, config)
    assert sum(v.numel() for v in converted.values()) == manifest["num_parameters"]
    from flair_hf import FlairModel

    with torch.device("meta"):
        model = FlairModel(config)
    assert set(converted) == set(model.state_dict())




def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    from conftest import FIXTURES

    tiny = str(FIXTURES / "tiny" / "flair-tiny-state-dict.pt")
    (tmp_path / "bad.json").write_text('{"model_cfg": {"embed_dim": 32}}')
    (tmp_path / "a-file").write_text("x")
    cases = [
        ([tiny, str(tmp_path / "o1"), "--open-clip-config", str(tmp_path / "missing.json")], "--open-clip-config .*missing.json: no such file"),
        ([tiny, str(tmp_path / "o2"), "--open-clip-config", str(tmp_path / "bad.json")], "needs open_clip's model config"),
        ([tiny, str(tmp_path / "a-file"), "--open-clip-config", str(FIXTURES / "tiny" / "open_clip_config.json")], "exists and is a file"),
    ]
    for args, message in cases:
        assert converter.main(args) == 1
        err = capsys.readouterr().err
        assert __import__("re").search(message, err) and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_model_card_metadata_parses_with_huggingface_hub(tmp_path):
    import json

    from huggingface_hub import ModelCard

    measured = [{"benchmark": "coco", "mode": "flair", "num_images": 5000, "num_texts": 25014,
                 "metrics": {"text_to_image_R@1": 53.1, "image_to_text_R@1": 67.9}}]  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(measured))
    path = tmp_path / "README.md"
    path.write_text(hub.model_card("me/flair-merged30m-hf", "flair-merged30m", {"logits_per_image": 1e-6},
                                         converter.read_results(str(tmp_path / "results.json"))))  # fmt: skip
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "zero-shot-image-classification"
    assert data.license == "mit" and "flair" in data.tags and data.base_model == "xiaorui638/flair"
    assert data.datasets == ["CC3M-recap (DreamLIP)", "CC12M-recap (DreamLIP)", "YFCC15M-recap (DreamLIP)"]
    results = {(r.dataset_type, r.dataset_config, r.metric_name): (r.metric_value, r.source_name) for r in data.eval_results}
    assert results[("coco", "published", "text-to-image R@1")] == (53.3, "FLAIR paper (published)")
    assert results[("flickr30k", "published", "image-to-text R@1")][0] == 94.7
    assert results[("coco", "measured", "image-to-text R@1")][0] == 67.9
    assert "measured with flair-hf" in results[("coco", "measured", "text-to-image R@1")][1]
    # a local checkpoint: no base model, no published results, no training-data claim
    local = ModelCard(hub.model_card("me/x", "flair-tiny.pt", None)).data
    assert local.base_model is None and local.eval_results is None and local.datasets is None
    with pytest.raises(state_dict.ConversionError, match="expected the JSON list that benchmarks/evaluate_retrieval.py writes"):
        (tmp_path / "bad.json").write_text("{}")
        converter.read_results(str(tmp_path / "bad.json"))


def test_sizes_are_read_from_the_checkpoint_and_heads_must_be_given(tmp_path, tiny_reference, capsys):
    from conftest import FIXTURES
    from flair_hf import FlairModel

    tiny = str(FIXTURES / "tiny" / "flair-tiny-state-dict.pt")
    with pytest.raises(state_dict.ConversionError, match=r"not ViT-B-16-FLAIR \(vision width 64, 2 layers, patch 16, image 224; "
                       r"text width 32, 2 layers, context 77, vocab 49408; embed dim 32\); head counts cannot be read"):  # fmt: skip
        converter.convert(tiny, tmp_path / "no-heads")
    converter.convert(tiny, tmp_path / "inferred", text_heads=2, vision_heads=2)
    model = FlairModel.from_pretrained(tmp_path / "inferred").eval()
    with torch.no_grad():
        logits = model(input_ids=tiny_reference["input_ids"].long(), pixel_values=tiny_reference["pixel_values"]).logits_per_image
    assert (logits - tiny_reference["logits_per_image"]).abs().max() <= 1e-5  # the original code's logits
    assert not (tmp_path / "no-heads").exists()
    capsys.readouterr()
    converter.convert(tiny, tmp_path / "assumed", text_heads=2)  # vision width 64: open_clip's rule gives 1 head
    assert "assumed 1 vision heads (open_clip's width / 64): head counts cannot be read from the weights, and --verify " \
        "cannot catch a wrong one" in capsys.readouterr().out
    assert FlairModel.from_pretrained(tmp_path / "assumed").config.vision_config.num_attention_heads == 1


def test_wrong_size_error_is_a_short_summary(tmp_path):
    from conftest import FIXTURES

    tiny = str(FIXTURES / "tiny" / "flair-tiny-state-dict.pt")
    with pytest.raises(state_dict.ConversionError) as error:
        converter.convert(tiny, tmp_path / "out", state_dict.VIT_B_16_FLAIR)
    message = str(error.value)
    assert len(message) < 1500, len(message)
    assert "expected architecture (vision width 768, 12 layers" in message and "The file looks like: vision width 64" in message
    assert "more; --verbose lists all" in message and "--open-clip-config" in message
    with pytest.raises(state_dict.ConversionError) as verbose:
        converter.convert(tiny, tmp_path / "out", state_dict.VIT_B_16_FLAIR, verbose=True)
    assert len(str(verbose.value)) > 5000 and "--verbose lists all" not in str(verbose.value)
