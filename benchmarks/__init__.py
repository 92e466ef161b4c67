"""Evaluation CLIs and speed/memory scripts, installed as `flair_hf_benchmarks`."""
