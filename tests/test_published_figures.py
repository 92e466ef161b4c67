"""`--compare-paper` of the classification and segmentation CLIs: published figures (secondary sources) beside a
full-set run only."""



from flair_hf_benchmarks.reporting import published_comparison


def test_a_full_set_run_is_compared_and_labelled_secondary():
    line = published_comparison("models/flair-merged30m-hf", "imagenet-1k", 55.1, 50000)
    assert line == "ImageNet-1k zero-shot top-1 of flair-merged30m: ours 55.1, published 56.6 (secondary source), difference -1.5."
    assert "published 73.0 (secondary source)" in published_comparison("flair-merged30m", "voc20", 70.0, 1449)


def test_a_partial_run_is_not_compared():
    line = published_comparison("flair-merged30m", "voc20", 12.0, 1)
    assert line == ("Published VOC20 zero-shot mIoU of flair-merged30m: 73.0 (secondary source), measured on all 1,449 images; "
                    "this run has 1, so it is not compared.")  # fmt: skip


def test_unknown_releases_say_so():
    assert published_comparison("flair-cc3m-recap-hf", "imagenet-1k", 30.0, 50000).startswith("No published imagenet-1k figure")
