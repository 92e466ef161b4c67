"""FLAIR on ONNX Runtime alone: no torch, no transformers (NumPy, PIL, ftfy, `tokenizers`, `onnxruntime`).

    from flair_hf.onnx import FlairOnnxModel
    model = FlairOnnxModel.from_pretrained("flair-onnx")      # written by conversion/export_onnx.py
    model.score("puppy.jpg", ["a small white puppy", "a red ladybug"])["probs"]

An exported directory holds the graphs that work together: the text encoder (token ids -> global text embeddings),
the image encoder (pixels -> global image embeddings and projected patch tokens), the pooling head's pair scorer
(text embeddings x patch tokens -> FLAIR cosines) and its attention maps (for dense maps and segmentation), the
processor files, and `flair_onnx.json` (logit scale and bias,
sizes, chunk sizes, where the graphs came from)."""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .preprocessing import (
    FLAIR_PAD_TOKEN_ID, array_to_image, as_image_list, as_text_list, clean_caption, image_to_pixels, open_image,
)  # fmt: skip
from .scoring import l2_normalize, length_sorted_groups, logits, pair_blocks, pairwise_cosine

MANIFEST = "flair_onnx.json"
FORMAT = "flair-onnx"
FORMAT_VERSION = 2
# laid out as transformers.js loads CLIP's towers (`CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection` read
# onnx/text_model.onnx and onnx/vision_model.onnx, `_quantized` for int8); the pooling head's two graphs beside them
GRAPHS = {"text": "onnx/text_model.onnx", "image": "onnx/vision_model.onnx", "pair": "onnx/pair_scorer.onnx",
          "attention": "onnx/pair_attention.onnx"}  # fmt: skip
PRECISIONS = ("fp32", "int8")
TEXT_LENGTH_GROUPS = 8  # the text graph takes padded batches: texts sorted by length into at least this many calls


def is_onnx_export(path) -> bool:
    """Whether `path` is a directory written by `conversion/export_onnx.py`."""
    return (Path(path) / MANIFEST).is_file()


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("flair_hf.onnx needs ONNX Runtime: pip install 'flair-hf[onnx]' (or onnxruntime)") from None
    return onnxruntime


def ids_up_to_end_of_text(input_ids) -> list[list[int]]:
    """Rows of a padded `(T, L)` id array, each up to its `<end_of_text>` (the largest id, as the model finds it)."""
    return [row[: int(np.argmax(row)) + 1].tolist() for row in np.asarray(input_ids)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _image(item):
    """A PIL image from a PIL image, a local path or an array (see `array_to_image`)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        return open_image(item)
    if isinstance(item, np.ndarray):
        return array_to_image(item)
    raise TypeError(f"FlairOnnxModel got a {type(item).__name__} image; pass a PIL image, a file path or a NumPy "
                    "array (H, W), (H, W, C) or (C, H, W)")


class FlairOnnxModel:
    """An exported FLAIR model on ONNX Runtime, with `FlairScorer`'s methods (NumPy arrays instead of tensors)."""

    def __init__(self, manifest: dict, sessions: dict, tokenizer, image_settings: dict):
        self.manifest, self.sessions = manifest, sessions
        self.tokenizer, self.image_settings = tokenizer, image_settings
        self.logit_scale, self.logit_bias = float(manifest["logit_scale"]), float(manifest["logit_bias"])

    @classmethod
    def from_pretrained(
        cls, path, providers: list[str] | None = None, session_options=None, precision: str | None = None
    ) -> "FlairOnnxModel":
        """Load an export from a local directory (or a Hub repository id, through the local Hub cache when offline).
        `precision`: `"int8"` (the default where the export has int8 graphs) or `"fp32"`. `providers` and
        `session_options` go to every `onnxruntime.InferenceSession` (default: CPU)."""
        directory = _local_directory(path)
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory / MANIFEST}: not a {FORMAT} v{FORMAT_VERSION} manifest; re-export with this flair-hf")
        graphs = _graphs(manifest, precision)
        missing = [name for name in GRAPHS if not (directory / graphs.get(name, GRAPHS[name])).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: the export lacks the {', '.join(missing)} graph(s) (an older or partial "
                                    "export); re-export with: python conversion/export_onnx.py MODEL_DIR OUT_DIR")  # fmt: skip
        sessions = _Sessions(directory, graphs, providers or ["CPUExecutionProvider"], session_options)
        return cls(manifest, sessions, _text_tokenizer(directory, manifest), _image_settings(directory))

    def token_ids(self, texts) -> list[list[int]]:
        """Each text's ids (cleaned as open_clip, `<start_of_text>` ... `<end_of_text>`, truncated to the context length)."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch([clean_caption(t) for t in as_text_list(texts)])]

    def pixel_values(self, images) -> np.ndarray:
        """`(B, 3, H, W)` float32 pixels of one image or a list, exactly as `FlairImageProcessor` makes them."""
        s = self.image_settings
        arrays = [image_to_pixels(_image(image), s["shortest_edge"], s["crop_size"], s["image_mean"], s["image_std"],
                                  s["rescale_factor"], s["resample"]) for image in as_image_list(images)]  # fmt: skip
        return np.stack(arrays) if arrays else np.zeros((0, 3, *s["crop_size"]), dtype=np.float32)

    def text_embeds(self, texts, batch_size: int = 256, show_progress_bar: bool = False) -> np.ndarray:
        """Global text embeddings `(T, D)` of a string or a list of strings, not normalised."""
        return self.embed_token_ids(self.token_ids(texts), batch_size, show_progress_bar)

    def embed_token_ids(self, ids: list[list[int]], batch_size: int = 256, show_progress_bar: bool = False) -> np.ndarray:
        """Global text embeddings `(T, D)` of token id lists (each ending in `<end_of_text>`), not normalised: texts
        sorted by length into at least the manifest's `length_groups` calls (of at most `batch_size`), each cut at its
        longest (later positions cannot reach `<end_of_text>` under the causal mask)."""
        embeds = np.zeros((len(ids), self.manifest["projection_dim"]), dtype=np.float32)
        calls = max(-(-len(ids) // batch_size), min(self.manifest["length_groups"], len(ids)))
        batches = length_sorted_groups([len(i) for i in ids], calls) if len(ids) else []
        for rows in tqdm(batches, desc="encoding texts", disable=not show_progress_bar):
            batch = np.full((len(rows), max(len(ids[r]) for r in rows)), FLAIR_PAD_TOKEN_ID, dtype=np.int64)
            for row, index in enumerate(rows):
                batch[row, : len(ids[index])] = ids[index]
            embeds[rows] = self.sessions["text"].run(None, {"input_ids": batch})[0]
        return embeds

    def image_features(self, images, batch_size: int = 64, show_progress_bar: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Global image embeddings `(B, D)` and projected patch tokens `(B, L, D)`, not normalised."""
        images = as_image_list(images)
        embeds, tokens = [], []
        for start in tqdm(range(0, len(images), batch_size), desc="encoding images", disable=not show_progress_bar):
            batch_embeds, batch_tokens = self.pixel_features(self.pixel_values(images[start : start + batch_size]))
            embeds.append(batch_embeds)
            tokens.append(batch_tokens)
        if not embeds:
            dim, patches = self.manifest["projection_dim"], self.manifest["num_patches"]
            return np.zeros((0, dim), np.float32), np.zeros((0, patches, dim), np.float32)
        return np.concatenate(embeds), np.concatenate(tokens)

    def pixel_features(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The image encoder on `(B, 3, H, W)` float32 pixels: global embeddings `(B, D)` and patch tokens `(B, L, D)`."""
        embeds, tokens = self.sessions["image"].run(None, {"pixel_values": np.asarray(pixel_values, dtype=np.float32)})
        return embeds, tokens

    def flair_logits(self, text_embeds: np.ndarray, image_token_embeds: np.ndarray) -> np.ndarray:
        """FLAIR logits `(B, T)`: `logit_scale * cosine + logit_bias`."""
        return logits(self.flair_cosines(text_embeds, image_token_embeds), self.logit_scale, self.logit_bias)

    def flair_cosines(self, text_embeds: np.ndarray, image_token_embeds: np.ndarray) -> np.ndarray:
        """Cosine of each image pooled for each text with that text: `(B, T)`."""
        return self._pairs("pair", text_embeds, image_token_embeds, ())

    def attention_maps(self, text_embeds: np.ndarray, image_token_embeds: np.ndarray) -> np.ndarray:
        """The pooling head's attention of each text over each image's patch tokens, averaged over heads, without the
        zero slot: `(B, T, L)` (`flair_hf.dense.caption_attention_maps` normalises and grids it)."""
        return self._pairs("attention", text_embeds, image_token_embeds, image_token_embeds.shape[1:2])

    def _pairs(self, graph: str, text_embeds: np.ndarray, image_token_embeds: np.ndarray, trailing: tuple) -> np.ndarray:
        """A pair graph over every (image, text) pair, in blocks of the export's chunk sizes: `(B, T, *trailing)`."""
        image_chunk, text_chunk = self.manifest["pair_chunk_sizes"]
        output = np.zeros((len(image_token_embeds), len(text_embeds), *trailing), dtype=np.float32)
        for images, texts in pair_blocks(len(image_token_embeds), len(text_embeds), image_chunk, text_chunk):
            feed = {"text_embeds": text_embeds[texts], "image_token_embeds": image_token_embeds[images]}
            output[images, texts] = self.sessions[graph].run(None, feed)[0]
        return output

    def encode_text(self, texts, batch_size: int = 256, show_progress_bar: bool = False) -> np.ndarray:
        """L2-normalised global embeddings `(T, D)` (float32) of a string or a list of strings."""
        return l2_normalize(self.text_embeds(texts, batch_size, show_progress_bar))

    def encode_image(self, images, batch_size: int = 64, show_progress_bar: bool = False) -> np.ndarray:
        """L2-normalised global embeddings `(B, D)` (float32) of one image or a list."""
        return l2_normalize(self.image_features(images, batch_size, show_progress_bar)[0])

    def score(self, images, texts) -> dict[str, np.ndarray]:
        """FLAIR logits `(B, T)` of images against texts, with `probs` (softmax over the texts), `sigmoid_probs` and
        the global `logits_as_clip`, as `FlairScorer.score`."""
        images, texts = as_image_list(images), as_text_list(texts)
        if not images or not texts:
            raise ValueError(f"score() got {len(images)} images and {len(texts)} texts: pass at least one of each")
        text_embeds = self.text_embeds(texts)
        image_embeds, tokens = self.image_features(images)
        flair = self.flair_logits(text_embeds, tokens)
        return {
            "logits": flair,
            "probs": _softmax(flair),
            "sigmoid_probs": 0.5 * (1 + np.tanh(flair / 2)),  # the sigmoid, without overflow for large logits
            "logits_as_clip": logits(pairwise_cosine(image_embeds, text_embeds), self.logit_scale),
        }


class _Sessions(dict):
    """ONNX Runtime sessions by graph name, each created on first use (a text-only deployment loads one graph)."""

    def __init__(self, directory: Path, files: dict, providers: list[str], session_options):
        super().__init__()
        self.directory, self.files, self.providers, self.session_options = directory, files, providers, session_options

    def __missing__(self, name: str):
        ort = _onnxruntime()
        session = self[name] = ort.InferenceSession(str(self.directory / self.files[name]), self.session_options, providers=self.providers)
        return session


def _looks_local(path) -> bool:
    """A path rather than a Hub repository id (`name` or `org/name`)."""
    text = str(path)
    return Path(text).exists() or Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1


def _local_directory(path) -> Path:
    """`path` if it is a directory, else the snapshot of Hub repository `path` (a clear error when it cannot be had)."""
    if Path(path).is_dir():
        if not is_onnx_export(path):
            raise FileNotFoundError(f"{path}: no {MANIFEST}; export a model first: python conversion/export_onnx.py MODEL_DIR {path}")
        return Path(path)
    if _looks_local(path):
        raise FileNotFoundError(f"{path}: no such directory; pass the directory conversion/export_onnx.py wrote")
    try:
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(str(path)))
    except Exception as error:  # noqa: BLE001  (offline, unknown repository, no access)
        raise OSError(f"{path}: not a local directory, and the Hub repository could not be fetched ({type(error).__name__}); "
                      "pass the directory conversion/export_onnx.py wrote") from None  # fmt: skip
    if not is_onnx_export(directory):
        raise FileNotFoundError(f"Hub repository {path} has no {MANIFEST}: it is not an ONNX export of flair-hf")
    return directory


def quantized_name(file: str) -> str:
    """Where an int8 graph goes: transformers.js' `_quantized` beside its fp32 graph."""
    return file.removesuffix(".onnx") + "_quantized.onnx"


def _graphs(manifest: dict, precision: str | None) -> dict:
    """The graph files of `precision` (default: int8 where the export has it, else fp32)."""
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    quantized = manifest.get("quantized_graphs")
    if precision == "int8" and not quantized:
        raise ValueError("this export has no int8 graphs: export it with --quantize int8, or pass precision='fp32'")
    return manifest["graphs"] if precision == "fp32" or not quantized else quantized


def _text_tokenizer(directory: Path, manifest: dict):
    """The saved `tokenizer.json` truncating to the context length (special tokens included), without padding."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(manifest["max_text_length"])
    return tokenizer


def _image_settings(directory: Path) -> dict:
    """The image processor's settings from the saved processor files."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (directory / name).is_file():
            config = json.loads((directory / name).read_text())
            config = config[key] if key else config
            break
    else:
        raise FileNotFoundError(f"{directory}: no processor_config.json or preprocessor_config.json; re-export the model")
    if config.get("do_convert_rgb") is False:
        raise ValueError(f"{directory}: the processor has do_convert_rgb=False; the exported image encoder takes RGB pixels "
                         "(set it to true in the processor config)")  # fmt: skip
    crop = config["crop_size"]
    return {
        "shortest_edge": config["size"]["shortest_edge"] if config.get("do_resize", True) else None,
        "crop_size": (crop["height"], crop["width"]) if config.get("do_center_crop", True) else None,
        "image_mean": config["image_mean"] if config.get("do_normalize", True) else None,
        "image_std": config["image_std"],
        "rescale_factor": config["rescale_factor"] if config.get("do_rescale", True) else None,
        "resample": config.get("resample", 3),
    }


__all__ = ["FlairOnnxModel", "ids_up_to_end_of_text", "is_onnx_export"]
