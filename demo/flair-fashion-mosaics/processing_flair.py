"""Image processor, tokenizer and processor for FLAIR that reproduce the original preprocessing exactly."""

import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, pre_tokenizers
from transformers import CLIPTokenizer
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils import PaddingStrategy, TensorType, logging

from .preprocessing import (
    FLAIR_PAD_TOKEN_ID, OPEN_CLIP_PATTERN, array_to_image, clean_caption, image_to_pixels, open_image, read_bpe_vocab,
)  # fmt: skip


class FlairImageProcessor(PilBackend):
    r"""
    The original FLAIR / open_clip evaluation transform, done with PIL in the same order:
    resize the shortest side to `size["shortest_edge"]` (bicubic) in the image's own mode, center crop to
    `crop_size` (zero padding if smaller), convert to RGB, scale to [0, 1] and normalise with the OpenAI mean/std.

    Converting to RGB *after* resizing matters for RGBA, palette, grayscale, CMYK and 16-bit images: PIL resamples
    them in their own mode, exactly as torchvision's `Resize` did in the original pipeline.

    Accepts PIL images, local file paths and NumPy arrays / torch tensors (gray, RGB or RGBA, HWC or CHW; uint8, or
    floats in [0, 1]; see `flair_hf.preprocessing.array_to_image`).
    Returns `pixel_values` of shape `(batch, 3, crop_height, crop_width)`, float32.
    """

    _auto_class = "AutoImageProcessor"

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def fetch_images(self, images):
        """Open local image paths (never the network) and read arrays and tensors (`array_to_image`; 4-D: a batch)
        into PIL images; anything else is passed through."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        if isinstance(images, (str, os.PathLike)):
            return open_image(images)
        if isinstance(images, (np.ndarray, torch.Tensor)):
            return [array_to_image(image) for image in images] if images.ndim == 4 else array_to_image(images)
        return images

    def process_image(self, image, **kwargs) -> Image.Image:
        """Keep PIL images in their own mode (they are converted to RGB after resizing)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"FlairImageProcessor got a {type(image).__name__}; expected a PIL image, array or path")
        return image

    def _preprocess(
        self,
        images: list[Image.Image],
        do_resize: bool,
        size,
        resample,
        do_center_crop: bool,
        crop_size,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        return_tensors: str | TensorType | None,
        do_convert_rgb: bool | None = None,
        **kwargs,
    ):
        processed = [
            image_to_pixels(
                image, size.shortest_edge if do_resize else None, (crop_size.height, crop_size.width) if do_center_crop else None,
                image_mean if do_normalize else None, image_std, rescale_factor if do_rescale else None, resample, bool(do_convert_rgb),
            )  # fmt: skip
            for image in images
        ]
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

logger = logging.get_logger(__name__)


def _warn_if_cut(encoding: BatchEncoding, max_length: int | None) -> BatchEncoding:
    """Warn (once per process and length) when truncation cut a text: FLAIR then sees only its beginning."""
    if any(e.overflowing for e in encoding.encodings or []):
        logger.warning_once(
            f"A text longer than {max_length} tokens was cut to its first {max_length} (the end-of-text token kept): "
            "split long captions into sentences (flair_hf.captions.split_sentences) to use all of them."
        )
    return encoding


class FlairTokenizer(CLIPTokenizer):
    r"""
    CLIP's byte-level BPE tokenizer made to agree with open_clip's `SimpleTokenizer`, which FLAIR was trained with,
    at every position. Two things differ from the stock [`CLIPTokenizer`]:

    - Text is cleaned as open_clip does (ftfy, which also straightens curly quotes, double HTML unescaping,
      whitespace folding, lowercasing) before BPE; the Rust normaliser alone cannot do this.
    - Sequences are padded with id 0 (the vocabulary entry `"!"`), like open_clip. `"!"` is *not* registered as a
      special token: that would split it out of words such as `"wow!"`. The pad token is therefore fixed.

    Use `padding="max_length", truncation=True, max_length=77` (the processor's defaults) for the original layout:
    truncation keeps `<|endoftext|>` last.
    """

    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        *args,
        unk_token="<end_of_text>",
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        pad_token=None,
        **kwargs,
    ):
        super().__init__(*args, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=None, **kwargs)
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(OPEN_CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )

    @property
    def pad_token(self) -> str:
        return self.convert_ids_to_tokens(FLAIR_PAD_TOKEN_ID)

    @property
    def pad_token_id(self) -> int:
        return FLAIR_PAD_TOKEN_ID

    def _encode_plus(self, text, text_pair=None, is_split_into_words: bool = False, **kwargs):
        if _is_empty_batch(text):
            raise ValueError("FlairTokenizer got an empty list of texts (e.g. candidate_labels=[]): pass at least one")
        if not is_split_into_words:
            text = _map_texts(clean_caption, text)
            text_pair = _map_texts(clean_caption, text_pair)
        if _is_padded_tensor_batch(text, text_pair, is_split_into_words, kwargs):
            encoding = self._encode_padded_batch(text, **kwargs)
        else:
            encoding = super()._encode_plus(text, text_pair, is_split_into_words=is_split_into_words, **kwargs)
        return _warn_if_cut(encoding, kwargs.get("max_length") or self.model_max_length)

    def _encode_padded_batch(self, texts, padding_strategy, truncation_strategy, max_length=None, pad_to_multiple_of=None,
                             padding_side=None, return_tensors=None, return_attention_mask=None, **_) -> BatchEncoding:  # fmt: skip
        """A padded batch of texts straight from the Rust encodings into arrays: the common processor call, which the
        generic path spends most of its time converting (per-encoding dicts, nested-list tensors)."""
        self.set_truncation_and_padding(
            padding_strategy=padding_strategy, truncation_strategy=truncation_strategy, max_length=max_length,
            stride=0, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
        )  # fmt: skip
        self._tokenizer.encode_special_tokens = bool(self.split_special_tokens)
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        lengths = {len(e.ids) for e in encodings}
        if len(lengths) > 1:
            raise ValueError(
                f"cannot make tensors of sequences of {min(lengths)} to {max(lengths)} tokens: pass truncation=True "
                f"(the processor does, at 77) or padding='longest'"
            )
        data = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64)}
        if return_attention_mask is not False:
            data["attention_mask"] = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        if return_tensors == "pt":
            data = {key: torch.from_numpy(value) for key, value in data.items()}
        return BatchEncoding(data, encodings)

    @classmethod
    def from_bpe_vocab(cls, bpe_path: str | os.PathLike | None = None, **kwargs) -> "FlairTokenizer":
        """Build the tokenizer from open_clip's `bpe_simple_vocab_16e6.txt.gz` (bundled with `flair_hf`)."""
        vocab, merges = read_bpe_vocab(bpe_path or os.path.join(os.path.dirname(__file__), "bpe_simple_vocab_16e6.txt.gz"))
        kwargs.setdefault("model_max_length", 77)
        return cls(vocab=vocab, merges=merges, **kwargs)


def _is_padded_tensor_batch(text, text_pair, is_split_into_words: bool, kwargs: dict) -> bool:
    """A list of strings, padded, to tensors, with special tokens and no extra outputs."""
    extras = ("return_token_type_ids", "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping",
              "return_length", "split_special_tokens", "stride", "sanitize_control_tokens")  # fmt: skip
    return (
        isinstance(text, (list, tuple)) and len(text) > 0 and all(isinstance(t, str) for t in text)
        and text_pair is None and not is_split_into_words and kwargs.get("return_tensors") in ("pt", "np")
        and kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD) != PaddingStrategy.DO_NOT_PAD
        and kwargs.get("add_special_tokens", True) and not any(kwargs.get(name) for name in extras)
    )  # fmt: skip


def _is_empty_batch(inputs) -> bool:
    return isinstance(inputs, (list, tuple)) and len(inputs) == 0


def _map_texts(function, texts):
    if texts is None:
        return None
    if isinstance(texts, str):
        return function(texts)
    return [function(text) for text in texts]


class FlairProcessor(ProcessorMixin):
    r"""
    Wraps a [`FlairImageProcessor`] and a [`FlairTokenizer`]. Text is padded to 77 tokens and truncated by default,
    as in the original; `__call__(text=..., images=...)` returns `input_ids`, `attention_mask` and/or `pixel_values`.
    """

    _auto_class = "AutoProcessor"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs):
        if text is None and images is None:
            raise ValueError("FlairProcessor needs `text`, `images` or both")
        encoding = {}
        if text is not None:
            text_kwargs = {"padding": "max_length", "truncation": True, "max_length": 77, **kwargs}
            if _is_empty_batch(text):  # a batch of no texts: (0, max_length), not an error from inside the tokenizer
                empty = np.zeros((0, text_kwargs["max_length"]), dtype=np.int64)
                encoding.update(input_ids=empty, attention_mask=empty.copy())
            else:
                encoding.update(self.tokenizer(text, return_tensors=return_tensors, **text_kwargs))
        if images is not None:
            if _is_empty_batch(images):  # (0, 3, H, W) like any other batch
                crop = self.image_processor.crop_size
                encoding["pixel_values"] = np.zeros((0, 3, crop["height"], crop["width"]), dtype=np.float32)
            else:
                encoding.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=encoding, tensor_type=return_tensors)


__all__ = ["FlairImageProcessor", "FlairTokenizer", "FlairProcessor", "clean_caption"]
