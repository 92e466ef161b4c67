"""The original FLAIR / open_clip preprocessing in NumPy, PIL, ftfy and `tokenizers` alone (no torch, no transformers):
shared by `FlairImageProcessor` / `FlairTokenizer` and the ONNX Runtime deployment (`flair_hf.onnx`)."""

import gzip
import html
import os
import re

import ftfy
import numpy as np
from PIL import Image, UnidentifiedImageError

FLAIR_PAD_TOKEN_ID = 0  # open_clip pads with id 0, which is the vocabulary entry "!"
# open_clip's `SimpleTokenizer` word pattern; its special tokens are named `<start_of_text>` / `<end_of_text>`,
# so the CLIP-style spellings `<|startoftext|>` are ordinary text.
OPEN_CLIP_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BICUBIC = 3  # PIL's and transformers' `PILImageResampling.BICUBIC`


def as_text_list(texts) -> list[str]:
    """One string, or an iterable of strings, as a list."""
    return [texts] if isinstance(texts, str) else list(texts)


def as_image_list(images) -> list:
    """One image (a PIL image, a path, or an array or tensor: anything with a `shape`), or an iterable of images, as a
    list."""
    return [images] if isinstance(images, (Image.Image, str, os.PathLike)) or hasattr(images, "shape") else list(images)


IMAGE_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}


def array_to_image(array) -> Image.Image:
    """A PIL image from an array or tensor `(H, W)`, `(H, W, C)` or `(C, H, W)` with C = 1 (gray), 3 (RGB) or 4
    (RGBA), in the image's own mode (RGBA is converted to RGB after resizing, as a PIL image is). Values as
    transformers' `to_pil_image` reads them: uint8 or whole numbers in 0-255 as they are, other floats in [0, 1]
    scaled by 255 (truncated)."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in IMAGE_CHANNELS and array.shape[-1] not in IMAGE_CHANNELS:
        array = array.transpose(1, 2, 0)  # channels first
    if not (array.ndim == 2 or array.ndim == 3 and array.shape[-1] in IMAGE_CHANNELS) or 0 in array.shape:
        raise ValueError(f"an image array of shape {tuple(array.shape)}: pass (H, W), (H, W, C) or (C, H, W) with "
                         "C = 1 (gray), 3 (RGB) or 4 (RGBA), or a batch (N, ...) of them as a list")
    array = _pixel_bytes(array)
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def _pixel_bytes(array: np.ndarray) -> np.ndarray:
    """uint8 pixels of an image array, read as transformers' `to_pil_image` reads them."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iuf":
        raise ValueError(f"an image array of dtype {array.dtype}: pass uint8 (0-255) or floats in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if np.allclose(array, array.astype(np.int64)) and 0 <= low and high <= 255:
        return array.astype(np.uint8)
    if 0 <= low and high <= 1:
        return (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    raise ValueError(f"an image array of {array.dtype} with values in [{low:g}, {high:g}]: pass uint8 (0-255) or "
                     "floats in [0, 1]")


def open_image(path) -> Image.Image:
    """Open and fully decode a local image file, with an error that names the file."""
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"FLAIR's preprocessing does not download images; download {path!r} and pass the file or image")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Cannot read image file {path}: {error}") from error


def resize_shortest_edge(image: Image.Image, shortest_edge: int, resample: int = BICUBIC) -> Image.Image:
    """torchvision `Resize(shortest_edge)` on a PIL image: the long side is truncated, not rounded."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=Image.Resampling(int(resample)))


def center_crop(image: Image.Image, crop_height: int, crop_width: int) -> Image.Image:
    """torchvision `CenterCrop` on a PIL image (zero padding when the image is smaller than the crop)."""
    width, height = image.size
    if width < crop_width or height < crop_height:
        padded = Image.new(image.mode, (max(width, crop_width), max(height, crop_height)))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return image.crop((left, top, left + crop_width, top + crop_height))


def image_to_pixels(
    image: Image.Image,
    shortest_edge: int | None,
    crop_size: tuple[int, int] | None,
    image_mean,
    image_std,
    rescale_factor: float | None = 1 / 255,
    resample: int = BICUBIC,
    convert_rgb: bool = True,
) -> np.ndarray:
    """One image in the original's order: resize the shortest side (in the image's own mode), center crop
    `(height, width)`, convert to RGB, scale to [0, 1], normalise; `(C, H, W)` float32. `None` skips a step."""
    if shortest_edge is not None:
        image = resize_shortest_edge(image, shortest_edge, resample)
    if crop_size is not None:
        image = center_crop(image, *crop_size)
    if convert_rgb:
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if rescale_factor is not None:
        array = array / np.float32(1.0 / rescale_factor)  # ToTensor divides by 255
    if image_mean is not None:
        array = (array - np.asarray(image_mean, dtype=np.float32)) / np.asarray(image_std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


# printable ASCII and line breaks without "&": ftfy and HTML unescaping leave such text unchanged (ftfy only touches
# non-ASCII characters, control characters, terminal escapes and HTML entities; line breaks fold into spaces anyway)
_PLAIN_TEXT = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


def clean_caption(text: str) -> str:
    """open_clip's text cleaning: ftfy, HTML unescaping (twice), whitespace folding, lowercasing."""
    if not _PLAIN_TEXT.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-to-character table, in the order that defines the first 256 vocabulary ids."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def read_bpe_vocab(bpe_path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges exactly as open_clip's `SimpleTokenizer` builds them (49,408 entries)."""
    with gzip.open(bpe_path) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    characters = bytes_to_unicode()
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m) for m in merges]
    tokens += ["<start_of_text>", "<end_of_text>"]
    return {token: index for index, token in enumerate(tokens)}, merges
