"""The offline demo works as written."""

import subprocess
import sys

from conftest import ROOT


def run_demo(*args, env_extra=None):
    env = {"HF_HUB_OFFLINE": "1", **__import__("os").environ, **(env_extra or {})}
    result = subprocess.run([sys.executable, "conversion/offline_demo.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FLAIR logits" in result.stdout and "CLIP logits" in result.stdout
    return result


def test_offline_demo_scores_held_out_mosaics_with_the_bundled_model(tmp_path):
    """Its default: the bundled trained model through remote code; each caption's first image printed equals the
    argmax of FlairScorer's logits (the library's own path), and here each caption finds its own mosaic."""
    import json

    from flair_hf import FlairScorer

    result = run_demo(env_extra={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert "a small FLAIR trained on Fashion-MNIST mosaics; for photos use a converted release" in result.stdout
    examples = json.loads((ROOT / "demo" / "examples" / "captions.json").read_text())
    names, captions = list(examples), [items[0] for items in examples.values()]
    logits = FlairScorer.from_pretrained(str(ROOT / "demo" / "flair-fashion-mosaics")).score([str(ROOT / "demo" / "examples" / n) for n in names], captions)["logits"]
    expected = [f"{caption!r} -> {names[best]}" for caption, best in zip(captions, logits.argmax(0).tolist())]
    assert [line for line in result.stdout.splitlines() if " -> " in line] == expected
    assert logits.argmax(0).tolist() == list(range(len(names)))


def test_offline_demo_runs_twice_into_one_directory(tmp_path):
    run_demo("--convert-tiny", "--output-dir", str(tmp_path))
    assert (tmp_path / "flair-tiny" / "model.safetensors").is_file()
    again = run_demo("--convert-tiny", "--output-dir", str(tmp_path))
    assert f"replacing the tiny model converted earlier in {tmp_path / 'flair-tiny'}" in again.stdout


def test_offline_demo_leaves_no_temporary_directory(tmp_path):
    run_demo("--convert-tiny", env_extra={"TMPDIR": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []
