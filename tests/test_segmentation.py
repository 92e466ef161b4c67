"""Zero-shot segmentation: layouts, sliding windows, SCLIP prediction, mIoU by hand, an oracle model, the CLI."""

import json

import evaluate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT
from segmentation_layouts import LABEL, build_segmentation_root
from flair_hf import FlairConfig, FlairModel, FlairTokenizer
from flair_hf.retrieval_data import BenchmarkDataError
from flair_hf.segmentation import (
    SEGMENTATION_SETS, IoUAccumulator, class_names, evaluate_segmentation, label_array, predict_labels,
    sliding_window_logits, window_starts,
)  # fmt: skip
from flair_hf.zero_shot import class_query_embeddings, imagenet_templates
from flair_hf.segmentation_data import load_segmentation_benchmark
from flair_hf_benchmarks import evaluate_segmentation as segmentation_cli


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_segmentation_root(tmp_path_factory.mktemp("segmentation"))


@pytest.mark.parametrize("name", sorted(SEGMENTATION_SETS))
def test_every_layout_loads_with_its_labels(data_root, name):
    dataset = load_segmentation_benchmark(name, data_root)
    assert len(dataset) == 2
    row = dataset[0]
    assert row["image"].size == (32, 16) and np.array_equal(np.asarray(row["label"]), LABEL)
    labels = label_array(row["label"], SEGMENTATION_SETS[name].reduce_zero_label)
    if name in ("voc20", "context59", "ade20k"):  # background dropped: 0 -> ignore, k -> k - 1, 255 stays ignored
        assert labels[0, :8].tolist() == [255] * 8 and labels[0, 8] == 0 and labels[0, 16] == 1 and labels[0, 24] == 255
    else:
        assert np.array_equal(labels, LABEL)
    assert len(class_names(name)) == {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81,
                                      "coco_stuff": 171, "cityscapes": 19, "ade20k": 150, "fashion-mosaics": 11}[name]  # fmt: skip


def test_missing_files_name_the_file_and_the_layout(tmp_path, data_root):
    with pytest.raises(BenchmarkDataError, match=r"voc20: missing .*val.txt \(expected layout: VOCdevkit/VOC2012"):
        load_segmentation_benchmark("voc20", tmp_path)
    (data_root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png").rename(tmp_path / "moved.png")
    try:
        with pytest.raises(BenchmarkDataError, match="ade20k: 1 missing file"):
            load_segmentation_benchmark("ade20k", data_root)
    finally:
        (tmp_path / "moved.png").rename(data_root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png")


def test_templates_and_synonyms():
    assert len(imagenet_templates()) == 80 and all("{}" in t for t in imagenet_templates())
    voc21 = class_names("voc21")
    assert voc21[0][:2] == ["sky", "wall"] and voc21[1] == ["aeroplane"]


def test_window_starts_follow_the_sclip_formula():
    assert window_starts(224, 224, 112) == [0]
    assert window_starts(336, 224, 112) == [0, 112]
    assert window_starts(500, 224, 112) == [0, 112, 224, 276]
    assert window_starts(100, 100, 112) == [0]


def test_sliding_window_on_a_224_image_is_one_pass(tiny_model, tiny_reference):
    pixels = tiny_reference["pixel_values"][:1]
    queries = F.normalize(torch.randn(5, tiny_model.config.projection_dim), dim=-1)
    scores = sliding_window_logits(tiny_model, pixels, queries)
    with torch.no_grad():
        tokens = F.normalize(tiny_model.get_image_token_features(pixels), dim=-1)
    single = (tokens @ queries.t()).transpose(1, 2).unflatten(-1, (14, 14))
    expected = F.interpolate(single, size=(224, 224), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # overlapping windows of a larger image are averaged: a 336-wide image has 2 windows per row
    wide = F.interpolate(pixels, size=(224, 336), mode="bilinear", align_corners=False)
    assert sliding_window_logits(tiny_model, wide, queries).shape == (5, 224, 336)


def test_prediction_thresholds():
    scores = torch.zeros(3, 2, 2)
    scores[1, 0, 0] = scores[2, 1, 1] = 1.0  # query 1 wins one pixel, query 2 another, the rest is a tie
    labels = predict_labels(scores, torch.tensor([0, 1, 1]), logit_scale=10, prob_thd=0.5)
    assert labels.tolist() == [[1, 0], [0, 1]]  # ties have probability 1/3 < 0.5 -> background
    big = torch.zeros(3, 10, 10)
    big[1, :, :9] = 1.0  # class 1: 90 pixels of foreground
    big[2, :, 9] = 1.0  # class 2: 10 pixels, 10% of the foreground -> dropped by area_thd 0.1
    labels = predict_labels(big, torch.tensor([0, 1, 2]), logit_scale=10, prob_thd=0.0, area_thd=0.1)
    assert (labels[:, :9] == 1).all() and (labels[:, 9] != 2).all()


def test_miou_equals_a_hand_computation():
    prediction = np.array([[0, 1], [1, 2]])
    label = np.array([[0, 1], [2, 255]])
    accumulator = IoUAccumulator(4)
    accumulator.add(prediction, label)
    accumulator.add(np.array([[3]]), np.array([[1]]))
    # class 0: I1 U1; class 1: I1, pred 2 (one each image... ) -> pred {1:2}, label {1:2} -> U 3; class 2: I0, pred 0
    # (the 2 sits on an ignored pixel), label 1 -> U 1; class 3: I0 pred 1 label 0 -> U 1
    result = accumulator.compute(["a", "b", "c", "d"])
    assert result["per_class_IoU"] == {"a": 100.0, "b": pytest.approx(100 / 3), "c": 0.0, "d": 0.0}
    assert result["mIoU"] == pytest.approx((100 + 100 / 3) / 4)
    assert result["pixel_accuracy"] == pytest.approx(2 / 4 * 100)
    metric = evaluate.load(str(ROOT / "benchmarks" / "metrics" / "flair_segmentation"))
    module = metric.compute(predictions=[prediction, [[3]]], references=[label, [[1]]], num_labels=4)
    assert module["mIoU"] == pytest.approx(result["mIoU"]) and module["pixel_accuracy"] == result["pixel_accuracy"]


class OracleFlair(FlairModel):
    """Patch tokens are the one-hot embedding of the patch's dominant colour's class; prompt embeddings are the
    one-hot embedding of the prompt's class. A perfect zero-shot segmenter on patch-aligned colour scenes."""

    COLOUR_CLASSES = (0, 2, 6)  # red -> aeroplane, green -> bird, blue -> car (voc20 indices)

    def __init__(self, config, tokenizer, classes):
        super().__init__(config)
        self.prompt_classes = {}
        for index, synonyms in enumerate(classes):
            prompts = [t.format(name) for name in synonyms for t in imagenet_templates()]
            for ids in tokenizer(prompts, padding="max_length", max_length=77)["input_ids"]:
                self.prompt_classes[tuple(ids)] = index

    def one_hot(self, indices):
        return F.one_hot(indices, self.config.projection_dim).float()

    def get_text_embeds(self, input_ids, attention_mask=None):
        return self.one_hot(torch.tensor([self.prompt_classes[tuple(row.tolist())] for row in input_ids]))

    def get_image_token_features(self, pixel_values, interpolate_pos_encoding=False):
        patches = F.avg_pool2d(pixel_values, self.config.vision_config.patch_size)  # (B, 3, h, w)
        classes = torch.tensor(self.COLOUR_CLASSES)[patches.argmax(dim=1)]
        return self.one_hot(classes.flatten(1))


def test_an_oracle_model_scores_miou_100(tmp_path):
    tokenizer = FlairTokenizer.from_bpe_vocab()
    config = FlairConfig(projection_dim=32, text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2}, vision_config={"hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 1, "num_attention_heads": 2})  # fmt: skip
    model = OracleFlair(config, tokenizer, class_names("voc20")).eval()
    # a 336 x 448 scene (no resize at short side 336) of patch-aligned colour bands, label file = voc20 class + 1;
    # bands only (no corner where three classes meet, where bilinear upsampling itself blurs the argmax)
    scene, label = np.zeros((336, 448, 3), dtype=np.uint8), np.zeros((336, 448), dtype=np.uint8)
    for (left, right), channel in (((0, 160), 0), ((160, 320), 1), ((320, 448), 2)):
        scene[:, left:right, channel] = 255
        label[:, left:right] = OracleFlair.COLOUR_CLASSES[channel] + 1
    label[:8] = 255  # an ignored strip
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True)
    Image.fromarray(scene).save(base / "JPEGImages" / "scene.jpg", quality=100)
    Image.fromarray(label).save(base / "SegmentationClass" / "scene.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("scene\n")
    result = evaluate_segmentation(model, tokenizer, load_segmentation_benchmark("voc20", tmp_path), "voc20", progress=False)
    assert result["mIoU"] == 100.0 and result["num_classes_present"] == 3 and result["pixel_accuracy"] == 100.0
    queries, query_to_class = class_query_embeddings(model, tokenizer, class_names("voc20"), imagenet_templates())
    assert len(queries) == sum(len(s) for s in class_names("voc20")) and query_to_class.max() == 19
    torch.testing.assert_close(queries, F.one_hot(query_to_class, 32).float())


@pytest.mark.parametrize("method, dtype", [("similarity", "float32"), ("attention", "bfloat16")])
def test_cli_on_tiny_layouts(tiny_dir, data_root, tmp_path, method, dtype, capsys):
    output = tmp_path / "results.json"
    results = segmentation_cli.main(["--model", str(tiny_dir), "--benchmark", "voc20", "--benchmark", "voc21", "--benchmark",
                                     "voc20", "--data-root", str(data_root), "--method", method, "--output", str(output),
                                     "--dtype", dtype])  # fmt: skip
    assert [r["benchmark"] for r in results] == ["voc20", "voc21"]  # the repeated benchmark runs once
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert 0 <= results[0]["mIoU"] <= 100 and len(results[0]["per_class_IoU"]) == 20 and results[0]["num_images"] == 2
    assert results[1]["settings"]["area_thd"] == 0.1 and results[1]["settings"]["logit_scale"] == 65
    assert results[0]["dtype"] == dtype
    assert f"| voc20 | {method} | 2 |" in output.with_suffix(".md").read_text() and "| voc21 |" in capsys.readouterr().out


def test_cli_missing_layout_is_one_clear_line(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="error: cityscapes: missing .*leftImg8bit"):
        segmentation_cli.main(["--model", str(tiny_dir), "--benchmark", "cityscapes", "--data-root", str(tmp_path)])


def test_the_paper_segmentation_command_of_the_manual(tiny_dir, data_root, tmp_path):
    """The segmentation section's command for the paper's benchmarks, with the tiny model and generated layouts."""
    from manual import bash_commands, run_command, section, workdir

    command = bash_commands(section("dense-maps.md", "Zero-shot semantic segmentation"))[-1]
    command = command.replace("flair-merged30m-hf", str(tiny_dir)).replace("/data/segmentation", str(data_root))
    work = workdir(tmp_path)
    run_command(command, work)
    results = json.loads((work / "segmentation.json").read_text())
    assert [r["benchmark"] for r in results] == ["voc20", "context59"] and (work / "segmentation.md").is_file()


def test_the_offline_segmentation_of_the_manual_on_the_bundled_model(tmp_path):
    """The section's first commands, as written: the bundled model on the 500 held-out mosaics, every class present."""
    from manual import bash_commands, run_command, section, workdir

    commands = bash_commands(section("dense-maps.md", "Zero-shot semantic segmentation"))[:2]
    assert [c.split()[1] for c in commands] == ["training/mosaics.py", "benchmarks/evaluate_segmentation.py"]
    work = workdir(tmp_path)
    for command in commands:
        run_command(command, work)
    (result,) = json.loads((work / "out" / "segmentation.json").read_text())
    assert result["num_images"] == 500 and result["method"] == "attention" and result["num_classes_present"] == 11
    assert (work / "out" / "segmentation.md").is_file() and 0 <= result["mIoU"] <= 100


def test_help_lists_layouts_and_how_to_obtain_them(capsys):
    with pytest.raises(SystemExit):
        segmentation_cli.main(["--help"])
    text = capsys.readouterr().out
    assert "ADEChallengeData2016/{images/validation" in text and "csCreateTrainIdLabelImgs" in text and "--prob-thd" in text


@pytest.mark.parametrize("problem", ["rgb", "size"])
def test_bad_label_files_are_one_line_errors_naming_the_file(tiny_dir, tmp_path, problem):
    from PIL import Image

    from segmentation_layouts import build_segmentation_root

    root = build_segmentation_root(tmp_path / "data")
    label = root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000002.png"
    original = Image.open(label)
    (original.convert("RGB") if problem == "rgb" else original.resize((20, 10))).save(label)
    with pytest.raises(SystemExit) as error:
        segmentation_cli.main(["--model", str(tiny_dir), "--benchmark", "voc20", "--data-root", str(root), "--output", str(tmp_path / "r.json")])
    expected = {
        "rgb": f"error: {label} is a RGB image: labels are single-channel PNGs of class indices (mode L or P)",
        "size": f"error: {label} is 20x10 but its image {label.parents[1] / 'JPEGImages' / '2007_000002.jpg'} is 32x16: a label must match its image",
    }[problem]
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
