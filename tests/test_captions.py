"""Caption parsing and FLAIR's diverse sub-caption sampling rules, on fixed seeds."""

import random

import pytest

from flair_hf.captions import caption_sentences, sample_subcaptions

SENTENCES = ["s0", "s1", "s2", "s3", "s4"]


def test_dreamlip_and_pixelprose_records():
    record = {"raw_caption": ["A dog."], "longSV_captions": ["It runs. Fast\nOn grass"], "shortIB_captions": "Sunny day."}
    assert caption_sentences(record) == ["A dog", "Sunny day", "It runs", "Fast", "On grass"]
    assert caption_sentences({"caption": "One. Two</s>Three\n\n"}) == ["One", "Two", "Three"]
    assert caption_sentences({"other": 1}) == []


def test_each_sampled_caption_follows_a_rule():
    rng = random.Random(0)
    seen_lengths = set()
    for _ in range(200):
        for caption in sample_subcaptions(SENTENCES, 8, max_merged=3, rng=rng):
            pieces = caption.split(". ")
            seen_lengths.add(len(pieces))
            assert 1 <= len(pieces) <= 3 and all(p in SENTENCES for p in pieces)
            indices = [SENTENCES.index(p) for p in pieces]
            consecutive = indices == list(range(indices[0], indices[0] + len(indices)))
            distinct = len(set(indices)) == len(indices)
            assert consecutive or distinct
    assert seen_lengths == {1, 2, 3}


class ConsecutiveBranch(random.Random):
    """Always takes the consecutive-run branch with m = 3."""

    def randint(self, a, b):
        return 3

    def random(self):
        return 0.0

    def randrange(self, *args):
        return STARTS.randrange(*args)


STARTS = random.Random(0)


def test_consecutive_runs_start_in_zero_to_n_minus_m_exclusive():
    captions = sample_subcaptions(SENTENCES, 500, max_merged=3, rng=ConsecutiveBranch(0))
    assert set(captions) == {"s0. s1. s2", "s1. s2. s3"}  # starts 0 and 1 only: [0, n - m) with n=5, m=3


def test_short_records():
    rng = random.Random(2)
    captions = sample_subcaptions(["only"], 20, max_merged=3, rng=rng)
    assert set(captions) <= {"only", "only. only", "only. only. only"}  # with replacement when fewer than m
    assert "only" in captions
    two = sample_subcaptions(["a", "b"], 50, max_merged=3, rng=random.Random(3))
    assert "a. b" in two  # m >= n joins all sentences in the consecutive branch
    with pytest.raises(ValueError, match="without sentences"):
        sample_subcaptions([], 1)


def test_seeded_sampling_is_reproducible():
    assert sample_subcaptions(SENTENCES, 8, rng=random.Random(7)) == sample_subcaptions(SENTENCES, 8, rng=random.Random(7))
