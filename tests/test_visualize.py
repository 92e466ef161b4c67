"""benchmarks/visualize.py: the manual's commands write a PNG with one coloured overlay panel per caption."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, ROOT

from flair_hf_benchmarks import visualize


def assert_overlay_png(path, size):
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[:2] == size[::-1], image.shape
    assert image.std() > 20  # not blank
    coloured = np.abs(image[..., 0] - image[..., 2]) > 60  # the jet overlay tints the photo
    assert coloured.mean() > 0.05, coloured.mean()


def test_the_dense_map_command_of_the_manual_draws_its_picture(tmp_path):
    """The Dense maps section's command, as written: it draws the picture the page shows."""
    from manual import bash_commands, run_command, section, workdir

    text = section("dense-maps.md", "Dense maps")
    (command,) = bash_commands(text)
    assert command.startswith("python benchmarks/visualize.py")
    work = workdir(tmp_path)
    assert "3 caption(s), attention maps" in run_command(command, work).stdout
    output = work / "out" / "dense-maps.png"
    assert_overlay_png(output, (768, 288))
    picture = ROOT / "benchmarks" / "results" / "dense-maps-fashion-mosaics.png"
    assert f"](../{picture.relative_to(ROOT)})" in text
    drawn, shown = (np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) for path in (output, picture))
    assert drawn.shape == shown.shape and np.abs(drawn - shown).mean() < 1.0


def test_grid_of_images_with_similarity_maps_at_a_larger_size(tiny_dir, tmp_path):
    images = [str(FIXTURES / "images" / name) for name in ("puppy.jpg", "arsenal.jpg")]
    output = visualize.main([*images, "--grid", "--model", str(tiny_dir), "--caption", "a puppy", "--caption", "two men",
                             "--kind", "similarity", "--image-size", "320", "--output", str(tmp_path / "grid.png")])  # fmt: skip
    assert_overlay_png(output, (512, 576))
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_arguments_are_clear_errors(tiny_dir, tmp_path):
    image = str(FIXTURES / "images" / "puppy.jpg")
    with pytest.raises(SystemExit):
        visualize.main([image, image, "--model", str(tiny_dir), "--caption", "a", "--output", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="image not found"):
        visualize.main([str(tmp_path / "none.jpg"), "--model", str(tiny_dir), "--caption", "a", "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("case", ["model", "not-an-image", "corrupt-image", "existing-output"])
def test_what_a_newcomer_mistypes_is_one_line(case, tiny_dir, tmp_path):
    """A wrong model path, a non-image, a truncated image, an existing output: one line, nothing written."""
    (tmp_path / "notes.png").write_text("not an image")
    data = (FIXTURES / "images" / "puppy.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")
    image, model, output, message = {
        "model": (FIXTURES / "images" / "puppy.jpg", tmp_path / "no-model", tmp_path / "a.png",
                  f"error: --model {tmp_path / 'no-model'}: cannot load a FLAIR model ("),
        "not-an-image": (tmp_path / "notes.png", tiny_dir, tmp_path / "a.png", f"error: {tmp_path / 'notes.png'} is not a readable image ("),
        "corrupt-image": (tmp_path / "cut.jpg", tiny_dir, tmp_path / "a.png", f"error: {tmp_path / 'cut.jpg'} is not a readable image ("),
        "existing-output": (FIXTURES / "images" / "puppy.jpg", tiny_dir, existing,
                            f"error: {existing} exists: pass another --output, or --overwrite to replace it"),
    }[case]  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "visualize.py"), str(image), "--model", str(model),
                             "--caption", "a dog", "--output", str(output)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert result.stderr.strip().startswith(message), result.stderr
    assert not (tmp_path / "a.png").exists() and existing.read_bytes() == b"keep me"


def test_overwrite_replaces_an_existing_output(tiny_dir, tmp_path):
    output = tmp_path / "maps.png"
    output.write_bytes(b"old")
    visualize.main([str(FIXTURES / "images" / "puppy.jpg"), "--model", str(tiny_dir), "--caption", "a puppy",
                    "--output", str(output), "--overwrite"])  # fmt: skip
    assert_overlay_png(output, Image.open(output).size)
