"""What FLAIR sees, in the browser: per-caption scores and heatmaps, zero-shot classes, segmentation and search.

    python demo/app.py [--model DIR_OR_HUB_ID] [--gallery DIR] [--port 7860]

Also a Hugging Face Space's `app.py` (the model from `FLAIR_MODEL`, the gallery from `FLAIR_GALLERY`). Without a
model it runs the bundled small FLAIR trained on Fashion-MNIST mosaics (`demo/flair-fashion-mosaics`; a banner says
so), so the page works offline. Every number on the page comes from `flair_hf`.

Safe to expose: visitors never name a path on the server. They search their own uploads, or the gallery the operator
chose with `--gallery` (indexed once at start-up). Uploads are capped in count, bytes and pixels; one model call runs
at a time (torch already uses every core) with at most `QUEUE_SIZE` requests waiting.
"""

import argparse
import hashlib
import html
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from flair_hf import FlairModel, FlairProcessor
from flair_hf.dense import dense_maps, feature_maps, upsample_maps
from flair_hf.retrieval import flair_scores, global_scores
from flair_hf.scorer import load_failure
from flair_hf.segmentation import SegmentationSet, segment_image
from flair_hf.zero_shot import class_query_embeddings, imagenet_templates

BUNDLED_MODEL = Path(__file__).resolve().parent / "flair-fashion-mosaics"
BUNDLED_BANNER = "**This page runs a small FLAIR trained on Fashion-MNIST mosaics; for photos use a converted release** (`--model`)."
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)], dtype=np.uint8)  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_UPLOADS = 32  # images a visitor may search at once
MAX_IMAGE_MEGABYTES = 10  # per uploaded file (also the server's upload limit)
MAX_PIXELS = 40_000_000  # per image, checked before it is decoded
GALLERY_LIMIT = 1000  # images in --gallery, unless --gallery-limit says otherwise
QUEUE_SIZE = 64  # requests waiting for the model; more are told the queue is full
KEPT_OUTPUTS = 512  # result images kept on disk until Gradio has copied them into its cache
CACHE_LIFETIME = 3600  # seconds Gradio keeps a result image in its cache (cleaned every half hour)


def load(model_id: str | None) -> tuple[FlairModel, FlairProcessor, bool]:
    """`(model, processor, bundled)`: `model_id`'s FLAIR, or without one the bundled small model."""
    path = model_id or BUNDLED_MODEL
    return FlairModel.from_pretrained(path).eval(), FlairProcessor.from_pretrained(path), not model_id


def lines(text: str | None, what: str) -> list[str]:
    items = [item.strip() for item in (text or "").replace(",", "\n").splitlines() if item.strip()]
    if not items:
        raise gr.Error(f"Type at least one {what} (one per line).")
    return items


def open_image(path) -> Image.Image:
    """An uploaded file as RGB, within the caps on bytes and pixels; a one-line message otherwise."""
    if path is None:
        raise gr.Error("Upload an image first.")
    name = Path(str(path)).name
    try:
        if os.path.getsize(path) > MAX_IMAGE_MEGABYTES * 2**20:
            raise gr.Error(f"{name} is over {MAX_IMAGE_MEGABYTES} MB: upload a smaller image.")
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise gr.Error(f"{name} has over {MAX_PIXELS // 10**6} million pixels: upload a smaller image.")
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError):
        raise gr.Error(f"Cannot read {name} as an image: upload a JPEG, PNG, WebP or BMP file.") from None


def shown_image(processor: FlairProcessor, pixel_values: torch.Tensor) -> np.ndarray:
    """The model's input (resized, center-cropped) back as an `(H, W, 3)` uint8 image."""
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    return ((pixel_values * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def overlay(image: np.ndarray, heat: torch.Tensor) -> Image.Image:
    """A map in [0, 1] over the image: red where high."""
    heat = heat.clamp(0, 1).numpy()[..., None]
    red = np.zeros_like(image)
    red[..., 0] = 255
    return Image.fromarray((image * (1 - 0.6 * heat) + red * 0.6 * heat).astype(np.uint8))


class OutputFiles:
    """Result images as PNG files named by their content, each written under a temporary name and renamed into place,
    so that concurrent requests with the same result never serve a half-written file (Gradio rewrites in place the
    images handed to it as arrays); the oldest beyond `KEPT_OUTPUTS` are removed."""

    def __init__(self):
        self._directory = tempfile.TemporaryDirectory(prefix="flair-demo-")
        self.directory = Path(self._directory.name)

    def save(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path = self.directory / f"{hashlib.sha256(buffer.getvalue()).hexdigest()}.png"
        if not path.exists():
            handle, staging = tempfile.mkstemp(dir=self.directory, suffix=".partial")
            with os.fdopen(handle, "wb") as file:
                file.write(buffer.getvalue())
            os.replace(staging, path)
            self._prune()
        return str(path)

    def _prune(self) -> None:
        files = sorted(self.directory.glob("*.png"), key=lambda p: p.stat().st_mtime)
        for old in files[:-KEPT_OUTPUTS]:
            old.unlink(missing_ok=True)


def table(element_id: str, header: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(f'{v:.4f}' if isinstance(v, float) else str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{element_id}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


@dataclass
class ImageIndex:
    """Images encoded once: names, global embeddings, patch tokens (for FLAIR scores and maps) and the model's input
    crops (to draw the maps on); `skipped` names the files that could not be read."""

    names: list[str]
    image_embeds: torch.Tensor
    token_embeds: torch.Tensor
    shown: list[np.ndarray]
    skipped: list[str]


@torch.no_grad()
def index_images(model: FlairModel, processor: FlairProcessor, paths: list, batch_size: int = 32) -> ImageIndex:
    """Encode the images at `paths` in batches, skipping (and naming) those that cannot be read within the caps."""
    names, embeds, tokens, shown, skipped = [], [], [], [], []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            try:
                images.append(open_image(path))
                names.append(Path(str(path)).name)
            except gr.Error as error:
                skipped.append(f"{Path(str(path)).name} ({error.message})")
        if images:
            pixels = processor(images=images)["pixel_values"]
            image_embeds, token_embeds = model.get_image_and_token_features(pixels)
            embeds.append(image_embeds)
            tokens.append(token_embeds)
            shown += [shown_image(processor, p) for p in pixels]
    if not names:
        raise gr.Error("None of the images could be read: upload JPEG, PNG, WebP or BMP files.")
    return ImageIndex(names, torch.cat(embeds), torch.cat(tokens), shown, skipped)


def gallery_paths(folder: str, limit: int) -> list[Path]:
    """The images directly in the operator's `--gallery` folder, at most `limit`; a one-line error otherwise."""
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"error: --gallery {folder}: no such folder")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"error: --gallery {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(paths) > limit:
        raise SystemExit(f"error: --gallery {folder} holds {len(paths)} images, over the limit of {limit}: pass --gallery-limit {len(paths)} or a smaller folder")
    return paths


class Demo:
    def __init__(self, model: FlairModel, processor: FlairProcessor, gallery: ImageIndex | None = None):
        self.model, self.processor, self.gallery = model, processor, gallery
        self.outputs = OutputFiles()

    @torch.no_grad()
    def captions(self, image, text, kind, progress=gr.Progress()):
        """Per caption: FLAIR logit, its sigmoid, the CLIP-style logit, and its heatmap; sorted by FLAIR logit."""
        image, captions = open_image(image), lines(text, "caption")
        progress(0.2, desc="scoring")
        inputs = self.processor(text=captions, images=image)
        output = self.model(**inputs)
        flair, clip = output.logits_per_image[0], output.logits_per_image_as_clip[0]
        progress(0.6, desc="heatmaps")
        maps = dense_maps(self.model, inputs["pixel_values"], inputs["input_ids"], kind=kind, upsample=True)[0]
        shown = shown_image(self.processor, inputs["pixel_values"][0])
        order = flair.argsort(descending=True).tolist()
        rows = [[captions[j], flair[j].item(), torch.sigmoid(flair[j]).item(), clip[j].item()] for j in order]
        gallery = [(self.outputs.save(overlay(shown, maps[j])), captions[j]) for j in order]
        return table("caption-scores", ["caption", "FLAIR logit", "sigmoid", "CLIP logit"], rows), gallery

    @torch.no_grad()
    def classify(self, image, text, progress=gr.Progress(track_tqdm=True)):
        """FLAIR and CLIP-style zero-shot scores of every class (80 prompt templates each), sorted by FLAIR."""
        image, names = open_image(image), lines(text, "class name")
        classes, _ = class_query_embeddings(self.model, self.processor.tokenizer, [[n] for n in names], imagenet_templates())
        pixels = self.processor(images=image)["pixel_values"]
        image_embeds, tokens = self.model.get_image_and_token_features(pixels)
        flair = flair_scores(self.model.text_conditioned_pooling, classes, tokens)[0]
        clip = global_scores(image_embeds, classes)[0]
        rows = [[names[j], flair[j].item(), clip[j].item()] for j in flair.argsort(descending=True).tolist()]
        return table("class-scores", ["class", "FLAIR cosine", "CLIP cosine"], rows)

    @torch.no_grad()
    def segment(self, image, text, progress=gr.Progress(track_tqdm=True)):
        """A colour per class (SCLIP's scheme, `flair_hf.segmentation`) over the image, with a legend."""
        image, names = open_image(image), lines(text, "class name")
        queries, query_to_class = class_query_embeddings(self.model, self.processor.tokenizer, [[n] for n in names], imagenet_templates())
        size = self.model.config.vision_config.image_size
        settings = SegmentationSet("custom", short_side=size)
        labels = segment_image(self.model, image, queries, query_to_class, settings, crop=size, stride=size // 2).numpy()
        colours = PALETTE[labels % len(PALETTE)]
        blended = Image.fromarray((np.asarray(image) * 0.5 + colours * 0.5).astype(np.uint8))
        shares = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
        legend = "".join(
            f'<li><span style="background:rgb{tuple(int(c) for c in PALETTE[k % len(PALETTE)])};padding:0 1em"></span> '
            f"{html.escape(name)}: {100 * shares[k]:.1f}%</li>"
            for k, name in enumerate(names)
        )
        return self.outputs.save(blended), f'<ul id="segment-legend">{legend}</ul>'

    def searched_images(self, source: str, uploads) -> ImageIndex:
        """The gallery (indexed at start-up) or the visitor's uploads (encoded now, unreadable ones skipped)."""
        if source == "gallery":
            if self.gallery is None:
                raise gr.Error("This page has no gallery: upload images to search.")
            return self.gallery
        if not uploads:
            raise gr.Error("Upload some images to search.")
        if len(uploads) > MAX_UPLOADS:
            raise gr.Error(f"{len(uploads)} images uploaded, over the limit of {MAX_UPLOADS}: upload fewer.")
        index = index_images(self.model, self.processor, [getattr(f, "name", f) for f in uploads])
        if index.skipped:
            gr.Warning("Skipped " + "; ".join(index.skipped))
        return index

    @torch.no_grad()
    def search(self, source, uploads, query, top, kind, progress=gr.Progress(track_tqdm=True)):
        """The top images by global similarity to the query, re-ranked by FLAIR's score, each with its heatmap."""
        query = lines(query, "query")[0]
        index = self.searched_images(source, uploads)
        text_embeds = self.model.get_text_embeds(self.processor(text=[query])["input_ids"])
        global_similarity = global_scores(index.image_embeds, text_embeds)[:, 0]
        candidates = global_similarity.argsort(descending=True)[: int(top)]
        tokens = index.token_embeds[candidates]
        flair = flair_scores(self.model.text_conditioned_pooling, text_embeds, tokens)[:, 0]
        vision = self.model.config.vision_config
        grid = (vision.image_size // vision.patch_size,) * 2
        maps = upsample_maps(feature_maps(self.model, text_embeds, tokens, grid, kind), (vision.image_size,) * 2)[:, 0]
        order = flair.argsort(descending=True).tolist()
        picked = [candidates[k].item() for k in order]
        rows = [[index.names[i], flair[k].item(), global_similarity[i].item()] for k, i in zip(order, picked)]
        gallery = [(self.outputs.save(overlay(index.shown[i], maps[k])), index.names[i]) for k, i in zip(order, picked)]
        return table("search-results", ["image", "FLAIR cosine", "global cosine"], rows), gallery


def build(model: FlairModel, processor: FlairProcessor, bundled: bool, gallery: ImageIndex | None = None) -> gr.Blocks:
    """The page; `gallery` (from `index_images` on the operator's folder) is searchable beside the visitor's uploads."""
    demo = Demo(model, processor, gallery)
    model_call = {"concurrency_id": "model", "concurrency_limit": 1}  # every tab's model call shares one slot
    with gr.Blocks(title="FLAIR: what each caption looks at", delete_cache=(CACHE_LIFETIME // 2, CACHE_LIFETIME)) as page:
        gr.Markdown("# FLAIR: fine-grained, text-conditioned image embeddings")
        if bundled:
            gr.Markdown(BUNDLED_BANNER, elem_id="bundled-banner")
        kinds = gr.Radio(["attention", "similarity"], value="attention", label="heatmap: pooling attention or patch similarity")
        with gr.Tab("Captions", id="captions"):
            with gr.Row():
                image = gr.Image(type="filepath", label="image", elem_id="captions-image")
                text = gr.Textbox(lines=5, label="captions, one per line", elem_id="captions-text")
            run = gr.Button("Score captions", elem_id="captions-run")
            scores, maps = gr.HTML(elem_id="captions-output"), gr.Gallery(label="heatmaps", columns=4, elem_id="captions-maps")
            run.click(demo.captions, [image, text, kinds], [scores, maps], api_name="captions", **model_call)
        with gr.Tab("Classify", id="classify"):
            with gr.Row():
                image = gr.Image(type="filepath", label="image", elem_id="classify-image")
                text = gr.Textbox(lines=5, label="class names, one per line", elem_id="classify-text")
            run = gr.Button("Classify", elem_id="classify-run")
            scores = gr.HTML(elem_id="classify-output")
            run.click(demo.classify, [image, text], scores, api_name="classify", **model_call)
        with gr.Tab("Segment", id="segment"):
            with gr.Row():
                image = gr.Image(type="filepath", label="image", elem_id="segment-image")
                text = gr.Textbox(lines=5, label="class names, one per line", elem_id="segment-text")
            run = gr.Button("Segment", elem_id="segment-run")
            with gr.Row():
                mask, legend = gr.Image(label="classes", elem_id="segment-mask"), gr.HTML(elem_id="segment-output")
            run.click(demo.segment, [image, text], [mask, legend], api_name="segment", **model_call)
        with gr.Tab("Search", id="search"):
            if gallery is not None:
                note = f"The gallery holds {len(gallery.names)} images" + (f" (skipped: {'; '.join(gallery.skipped)})" if gallery.skipped else "") + "."
                gr.Markdown(html.escape(note), elem_id="search-gallery-note")
            with gr.Row():
                source = gr.Radio(["gallery", "uploads"], value="gallery" if gallery is not None else "uploads", label="search",
                                  visible=gallery is not None, elem_id="search-source")  # fmt: skip
                uploads = gr.File(file_count="multiple", file_types=["image"], label=f"your images (up to {MAX_UPLOADS})", elem_id="search-uploads")
            with gr.Row():
                query = gr.Textbox(label="query", elem_id="search-text")
                top = gr.Slider(1, 32, value=8, step=1, label="candidates re-ranked by FLAIR")
            run = gr.Button("Search", elem_id="search-run")
            results, maps = gr.HTML(elem_id="search-output"), gr.Gallery(label="heatmaps", columns=4, elem_id="search-maps")
            run.click(demo.search, [source, uploads, query, top, kinds], [results, maps], api_name="search", **model_call)
    page.queue(max_size=QUEUE_SIZE)
    return page


def serve(page: gr.Blocks, port: int, **options):
    """Serve the page with the upload limit, on 127.0.0.1 unless the host says otherwise (a Space sets
    GRADIO_SERVER_NAME=0.0.0.0)."""
    server = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    return page.launch(server_name=server, server_port=port, max_file_size=f"{MAX_IMAGE_MEGABYTES}mb", **options)


def load_or_exit(model_id: str | None) -> tuple[FlairModel, FlairProcessor, bool]:
    if not model_id and not (BUNDLED_MODEL / "config.json").is_file():
        raise SystemExit(f"error: the bundled model {BUNDLED_MODEL.name}/ is not beside app.py: copy it there, or name a model "
                         "with --model or the FLAIR_MODEL variable")  # fmt: skip
    try:
        return load(model_id)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {load_failure(model_id, error)}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("FLAIR_MODEL"), help="converted FLAIR directory or Hub id (default: $FLAIR_MODEL, else the bundled small FLAIR)")
    parser.add_argument("--gallery", default=os.environ.get("FLAIR_GALLERY"), help="a folder of images visitors may search, indexed at start-up (default: $FLAIR_GALLERY, else none)")
    parser.add_argument("--gallery-limit", type=int, default=GALLERY_LIMIT, help=f"most images the gallery may hold (default: {GALLERY_LIMIT})")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port (default: 7860)")
    args = parser.parse_args(argv)
    paths = gallery_paths(args.gallery, args.gallery_limit) if args.gallery else None  # its mistakes before the model loads
    model, processor, bundled = load_or_exit(args.model)
    gallery = None
    if paths is not None:
        try:
            gallery = index_images(model, processor, paths)
        except gr.Error as error:
            raise SystemExit(f"error: --gallery {args.gallery}: {error.message}") from None
        print(f"gallery: {len(gallery.names)} images indexed" + "".join(f"\nskipped {item}" for item in gallery.skipped), file=sys.stderr)
    serve(build(model, processor, bundled, gallery), args.port)


if __name__ == "__main__":
    main()
