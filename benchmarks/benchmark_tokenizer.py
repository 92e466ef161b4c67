"""Tokenizer speed: FlairTokenizer vs open_clip's `SimpleTokenizer` algorithm (the original's), side by side.

    python benchmarks/benchmark_tokenizer.py [--captions 25014] [--source coco] [--rounds 5]
        [--output benchmarks/results/tokenizer-cpu.json]

Captions: the reference cases of `tests/fixtures/tokenizer_cases.json` from `--source` (real COCO captions by default),
repeated to `--captions`. The baseline is open_clip 3.3's `SimpleTokenizer` re-implemented line for line (ftfy +
double HTML unescaping + whitespace folding + lowercasing, its regex, per-word BPE with its cache, `(N, 77)` output);
each round builds both tokenizers fresh (not timed) and tokenizes all captions with each, in alternating order. The
outputs must be identical. Prints the median seconds and the speed ratio and writes JSON.
"""

import argparse
import html
import json
import platform
import statistics
import time
from pathlib import Path

import ftfy
import regex
import torch
from flair_hf_benchmarks.reporting import write_json

from flair_hf import FlairTokenizer
from flair_hf.preprocessing import OPEN_CLIP_PATTERN, bytes_to_unicode, read_bpe_vocab

ROOT = Path(__file__).resolve().parents[1]
BPE_PATH = ROOT / "src" / "flair_hf" / "bpe_simple_vocab_16e6.txt.gz"


class OpenClipSimpleTokenizer:
    """open_clip's `SimpleTokenizer` (clean="lower"), the baseline: Python BPE over regex words, cached per word."""

    def __init__(self):
        self.encoder, merges = read_bpe_vocab(BPE_PATH)
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        byte_order = printable + [b for b in range(256) if b not in printable]  # the order of `bytes_to_unicode`
        self.byte_encoder = dict(zip(byte_order, bytes_to_unicode()))
        self.cache = {"<start_of_text>": "<start_of_text>", "<end_of_text>": "<end_of_text>"}
        self.pattern = regex.compile(OPEN_CLIP_PATTERN, regex.IGNORECASE)
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = {(a, b) for a, b in zip(word, word[1:])}
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        text = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).strip().lower()
        tokens = []
        for word in self.pattern.findall(text):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            tokens.extend(self.encoder[piece] for piece in self.bpe(word).split(" "))
        return tokens

    def __call__(self, texts: list[str], context_length: int = 77) -> torch.Tensor:
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = [self.sot] + self.encode(text) + [self.eot]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = self.eot
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result


def load_captions(count: int, source: str) -> list[str]:
    cases = json.loads((ROOT / "tests" / "fixtures" / "tokenizer_cases.json").read_text())["cases"]
    texts = [case["text"] for case in cases if source == "all" or case["source"] == source]
    return (texts * (count // len(texts) + 1))[:count]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=25014, help="captions per round (default: 25014, COCO val2017)")
    parser.add_argument("--source", default="coco", help="coco, flickr30k, iiw_subcaptions, urban1k_long or all")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--output", default="benchmarks/results/tokenizer-cpu.json", help="JSON file")
    args = parser.parse_args(argv)
    captions = load_captions(args.captions, args.source)
    times = {"original": [], "flair_hf": []}
    outputs = {}
    for round_index in range(args.rounds):
        tokenizers = {
            "original": OpenClipSimpleTokenizer(),
            "flair_hf": FlairTokenizer.from_bpe_vocab(),
        }
        order = list(tokenizers) if round_index % 2 == 0 else list(tokenizers)[::-1]
        for name in order:
            tokenize = tokenizers[name]
            call = (lambda t=tokenize: t(captions)) if name == "original" else (
                lambda t=tokenize: t(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
            )  # fmt: skip
            start = time.perf_counter()
            outputs[name] = call()
            times[name].append(time.perf_counter() - start)
    identical = torch.equal(outputs["original"], outputs["flair_hf"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "captions": len(captions), "source": args.source, "rounds": args.rounds, "identical_ids": identical,
        "median_seconds": medians, "speed_ratio_flair_hf_over_original": medians["original"] / medians["flair_hf"],
        "all_seconds": times, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }  # fmt: skip
    print(f"{len(captions)} {args.source} captions: original {medians['original']:.2f} s, flair_hf {medians['flair_hf']:.2f} s, "
          f"flair_hf is {report['speed_ratio_flair_hf_over_original']:.2f}x the original's speed; identical ids: {identical}")  # fmt: skip
    if not identical:
        raise SystemExit("the tokenizers disagree: the speed comparison is void")
    write_json(report, args.output)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
