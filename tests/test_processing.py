"""Tokenizer and image preprocessing equal the original at every position / pixel."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from transformers.image_transforms import to_pil_image

from conftest import FIXTURES


@pytest.fixture(scope="module")
def tokenizer():
    from flair_hf import FlairTokenizer

    return FlairTokenizer.from_bpe_vocab()


@pytest.fixture(scope="module")
def image_processor():
    from flair_hf import FlairImageProcessor

    return FlairImageProcessor()


def reference_ids(case):
    return case["input_ids"] + [0] * (77 - len(case["input_ids"]))


def test_every_tokenizer_case_matches_at_all_77_positions(tokenizer):
    cases = json.loads((FIXTURES / "tokenizer_cases.json").read_text())["cases"]
    assert len(cases) == 2477
    encoded = tokenizer([c["text"] for c in cases], padding="max_length", truncation=True, max_length=77)["input_ids"]
    mismatches = [c["text"][:80] for c, ids in zip(cases, encoded) if ids != reference_ids(c)]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("wow!", [49406, 2781, 256, 49407]),  # '!' stays part of the word's pieces, not the pad id 0
        ("“P”", None),  # curly quotes straightened by ftfy, like straight ones
        ("fish &amp; chips", None),  # HTML entity unescaped, like '&'
    ],
)
def test_cleaning_cases(tokenizer, text, expected):
    ids = tokenizer(text)["input_ids"]
    if expected is not None:
        assert ids == expected
    assert 0 not in ids
    if "“" in text:
        assert ids == tokenizer('"P"')["input_ids"]
    if "&amp;" in text:
        assert ids == tokenizer("fish & chips")["input_ids"]


def test_padding_uses_id_zero_and_truncation_keeps_end_of_text(tokenizer):
    assert tokenizer.pad_token_id == 0
    short = tokenizer("a dog", padding="max_length", max_length=77)
    assert short["input_ids"][3] == 49407 and short["input_ids"][4:] == [0] * 73
    assert short["attention_mask"] == [1] * 4 + [0] * 73
    long = tokenizer("dog " * 200, padding="max_length", truncation=True, max_length=77)["input_ids"]
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "FlairTokenizer"
    text = ["A “quoted” caption &amp; more!", "<|startoftext|> plain"]
    assert reloaded(text, padding="max_length", max_length=77)["input_ids"] == tokenizer(
        text, padding="max_length", max_length=77
    )["input_ids"]


def test_preprocessing_matches_reference_for_every_image(image_processor):
    reference = load_file(FIXTURES / "preprocess_reference.safetensors")
    assert len(reference) == 6
    for name, expected in reference.items():
        got = image_processor(str(FIXTURES / "preprocess_images" / name), return_tensors="np")["pixel_values"][0]
        assert got.shape == expected.shape == (3, 224, 224)
        assert np.abs(got - expected).max() <= 1e-6, name


def _original_transform(image: Image.Image) -> np.ndarray:
    """The original's order written out with PIL: resize (own mode), crop, RGB, /255, normalise."""
    w, h = image.size
    size = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    image = image.resize(size, Image.BICUBIC)
    left, top = int(round((image.width - 224) / 2.0)), int(round((image.height - 224) / 2.0))
    array = np.asarray(image.crop((left, top, left + 224, top + 224)).convert("RGB"), dtype=np.float32) / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return ((array - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1", "F"])
def test_image_modes(image_processor, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (90, 130), dtype=np.uint16))
    elif mode == "RGBA":
        image = rgb.convert("RGBA")
        image.putalpha(Image.fromarray(rng.integers(0, 256, (90, 130), dtype=np.uint8)))
    else:
        image = rgb.convert(mode)
    got = image_processor(image, return_tensors="np")["pixel_values"]
    assert got.shape == (1, 3, 224, 224) and got.dtype == np.float32 and np.isfinite(got).all()
    if mode in ("L", "RGBA", "P", "CMYK"):
        assert np.abs(got[0] - _original_transform(image)).max() <= 1e-6


def _rgba(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, mode="RGBA")


@pytest.mark.parametrize(
    "make, reference",
    [
        (lambda rng: rng.integers(0, 256, (50, 70), dtype=np.uint8), Image.fromarray),
        (lambda rng: rng.integers(0, 256, (50, 70, 1), dtype=np.uint8), lambda a: Image.fromarray(a[..., 0])),
        (lambda rng: rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), _rgba),
        (lambda rng: rng.integers(0, 256, (4, 50, 70), dtype=np.uint8), lambda a: _rgba(a.transpose(1, 2, 0))),
        (lambda rng: rng.random((50, 70, 3), dtype=np.float32), to_pil_image),
        (lambda rng: torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(0)), to_pil_image),
        (lambda rng: rng.integers(0, 256, (50, 70, 3)).astype(np.float64), to_pil_image),
    ],
    ids=["gray", "gray-hw1", "rgba", "rgba-chw", "float-0-1", "float-tensor-chw", "float-0-255"],
)
def test_arrays_and_tensors_are_read_as_the_pil_image_of_their_pixels(image_processor, make, reference):
    """Arrays and tensors become the PIL image of their pixels (values read as transformers' `to_pil_image` reads
    them; gray and RGBA in their own mode), then follow the original transform."""
    array = make(np.random.default_rng(0))
    got = image_processor(array, return_tensors="np")["pixel_values"]
    assert got.shape == (1, 3, 224, 224)
    assert np.abs(got[0] - _original_transform(reference(array))).max() <= 1e-6
    pair = np.stack([np.asarray(array)] * 2) if array.ndim == 3 else [array, array]  # 4-D: a batch (3-D: one image)
    batch = image_processor(pair, return_tensors="np")["pixel_values"]
    assert batch.shape == (2, 3, 224, 224) and np.array_equal(batch[1], got[0])


def test_unusable_arrays_get_clear_errors(image_processor):
    for array, message in (
        (np.full((8, 8, 3), 2.5, dtype=np.float32), r"values in \[2.5, 2.5\]: pass uint8 \(0-255\) or floats in \[0, 1\]"),
        (np.zeros((8, 8, 5), dtype=np.uint8), r"shape \(8, 8, 5\): pass \(H, W\), \(H, W, C\) or \(C, H, W\)"),
        (np.zeros((8, 8, 3), dtype=bool), "dtype bool"),
        (np.zeros((0, 8, 3), dtype=np.uint8), r"shape \(0, 8, 3\)"),
    ):
        with pytest.raises(ValueError, match=message):
            image_processor(array)


def test_one_pixel_image_and_batch(image_processor):
    single = image_processor(Image.new("RGB", (1, 1), (255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert single.shape == (1, 3, 224, 224)
    assert torch.allclose(single[0, :, 0, 0], single[0, :, 100, 100])
    batch = image_processor([Image.new("RGB", (10, 20)), np.zeros((30, 40, 3), dtype=np.uint8)], return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 224, 224)


def test_unreadable_and_non_image_inputs_get_clear_errors(image_processor, tmp_path):
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:40])
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    for path in (truncated, text_file):
        with pytest.raises(ValueError, match=path.name):
            image_processor(str(path))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        image_processor(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="does not download"):
        image_processor("https://example.com/cat.jpg")
    with pytest.raises((TypeError, ValueError)):
        image_processor({"not": "an image"})


def test_processor_single_and_batch(tmp_path):
    from transformers import AutoProcessor

    from flair_hf import FlairImageProcessor, FlairProcessor, FlairTokenizer

    processor = FlairProcessor(FlairImageProcessor(), FlairTokenizer.from_bpe_vocab())
    single = processor(text="a dog", images=Image.new("RGB", (50, 60)))
    assert single["input_ids"].shape == (1, 77) and single["pixel_values"].shape == (1, 3, 224, 224)
    batch = processor(text=["a dog", "a cat"])
    assert batch["input_ids"].shape == (2, 77) and "pixel_values" not in batch
    with pytest.raises(ValueError, match="text"):
        processor()
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "FlairProcessor"
    assert torch.equal(reloaded(text=["a dog"])["input_ids"], processor(text=["a dog"])["input_ids"])


def test_plain_text_fast_path_equals_the_full_cleaning():
    """ftfy and HTML unescaping are skipped for plain ASCII without '&': the result must be what they would give."""
    import html
    import random

    import ftfy

    from flair_hf.preprocessing import _PLAIN_TEXT, clean_caption

    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n", "\r", "\r\n"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    texts += ["Quote 'single' \"double\" <b>tag</b> a;b#c", "  spaced\r\nlines\tand tabs  ", "", "~`!@#$%^*()_+{}|:<>?"]
    for text in texts:
        assert _PLAIN_TEXT.fullmatch(text)
        full = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).lower()
        assert clean_caption(text) == full, repr(text)
    for text in ("fish &amp; chips", "caf\u00e9", "\u201cquoted\u201d", "bell\x07", "esc\x1b[31m"):
        assert not _PLAIN_TEXT.fullmatch(text)


def test_batched_tensors_equal_one_by_one(tokenizer):
    texts = ["a dog", "a much longer caption about a cat on a mat", ""]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, 77)
    for row, text in enumerate(texts):
        single = tokenizer(text, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        assert torch.equal(batch["input_ids"][row], single["input_ids"][0])
        assert torch.equal(batch["attention_mask"][row], single["attention_mask"][0])
    longest = tokenizer(texts, padding=True, return_tensors="np")
    assert longest["input_ids"].shape == (3, len(tokenizer(texts[1])["input_ids"]))
    with pytest.raises(ValueError, match="pass truncation=True"):
        tokenizer(["word " * 100, "a"], padding="max_length", max_length=77, return_tensors="pt")


def test_empty_batches_have_batch_shapes(tokenizer, image_processor):
    from flair_hf import FlairProcessor

    processor = FlairProcessor(image_processor, tokenizer)
    out = processor(text=[], images=[])
    assert out["input_ids"].shape == (0, 77) and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].shape == (0, 77) and out["pixel_values"].shape == (0, 3, 224, 224)


def test_bare_tokenizer_pads_to_77_when_asked(tokenizer):
    ids = tokenizer(["a dog", "word " * 100], padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert ids.shape == (2, 77) and ids[0, 3] == 49407 and ids[1, 76] == 49407 and tokenizer.model_max_length == 77


def test_a_caption_cut_at_77_tokens_is_warned_about_once():
    from transformers.testing_utils import CaptureLogger

    from flair_hf import FlairTokenizer
    from flair_hf.processing_flair import logger

    tokenizer = FlairTokenizer.from_bpe_vocab()
    logger.warning_once.cache_clear()
    long = "a small white puppy on a wooden porch " * 12  # 96 words
    with CaptureLogger(logger) as captured:
        tokenizer(["a dog", "a cat"], padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        assert captured.out == ""  # nothing cut, nothing said
        for _ in range(2):
            tokenizer([long, "a dog"], padding="max_length", truncation=True, max_length=77, return_tensors="pt")  # the fast path
            tokenizer(long, truncation=True, max_length=77)  # the generic one
    assert captured.out.count("A text longer than 77 tokens was cut to its first 77") == 1, captured.out
