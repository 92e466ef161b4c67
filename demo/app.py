"""What FLAIR sees, in the browser: per-caption scores and heatmaps, zero-shot classes, segmentation and search.

    python demo/app.py [--model DIR_OR_HUB_ID] [--port 7860]

Also a Hugging Face Space's `app.py` (the model from `FLAIR_MODEL`). Without a model it builds a tiny FLAIR with
random weights (a banner says so), so the page works offline. Every number on the page comes from `flair_hf`.
"""

import argparse
import html
import os
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from flair_hf import FlairConfig, FlairImageProcessor, FlairModel, FlairProcessor, FlairTokenizer
from flair_hf.dense import dense_maps
from flair_hf.retrieval import flair_scores, global_scores
from flair_hf.segmentation import SegmentationSet, segment_image
from flair_hf.zero_shot import class_query_embeddings, imagenet_templates

TINY = {"projection_dim": 32, "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}}  # fmt: skip
RANDOM_BANNER = "**This page runs a tiny FLAIR with random weights: the scores and maps mean nothing.** Start it with `--model` (a converted FLAIR) to see what FLAIR sees."
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)], dtype=np.uint8)  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def load(model_id: str | None) -> tuple[FlairModel, FlairProcessor, bool]:
    """`(model, processor, random_weights)`: a converted FLAIR, or a seeded tiny random one."""
    if model_id:
        return FlairModel.from_pretrained(model_id).eval(), FlairProcessor.from_pretrained(model_id), False
    torch.manual_seed(0)
    model = FlairModel(FlairConfig(**TINY)).eval()
    size = model.config.vision_config.image_size
    image_processor = FlairImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, FlairProcessor(image_processor, FlairTokenizer.from_bpe_vocab()), True


def lines(text: str | None, what: str) -> list[str]:
    items = [item.strip() for item in (text or "").replace(",", "\n").splitlines() if item.strip()]
    if not items:
        raise gr.Error(f"Type at least one {what} (one per line).")
    return items


def open_image(image) -> Image.Image:
    if image is None:
        raise gr.Error("Upload an image first.")
    try:
        return (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
    except OSError as error:
        raise gr.Error(f"Cannot read the image {Path(str(image)).name}: {error}") from None


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


def table(element_id: str, header: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(f'{v:.4f}' if isinstance(v, float) else str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{element_id}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


class Demo:
    def __init__(self, model: FlairModel, processor: FlairProcessor):
        self.model, self.processor = model, processor

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
        gallery = [(overlay(shown, maps[j]), captions[j]) for j in order]
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
        return blended, f'<ul id="segment-legend">{legend}</ul>'

    @torch.no_grad()
    def search(self, folder, uploads, query, top, kind, progress=gr.Progress(track_tqdm=True)):
        """The top images by global similarity to the query, re-ranked by FLAIR's score, each with its heatmap."""
        query = lines(query, "query")[0]
        paths = [Path(f) for f in (uploads or [])]
        if folder and folder.strip():
            root = Path(folder.strip())
            if not root.is_dir():
                raise gr.Error(f"No such folder on the server: {root}")
            paths += sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise gr.Error("Give a folder of images on the server or upload some images.")
        images = [open_image(p) for p in paths]
        image_embeds = self.model.get_image_embeds(self.processor(images=images)["pixel_values"])
        global_similarity = global_scores(image_embeds, self.model.get_text_embeds(self.processor(text=[query])["input_ids"]))[:, 0]
        candidates = global_similarity.argsort(descending=True)[: int(top)].tolist()
        inputs = self.processor(text=[query], images=[images[i] for i in candidates])
        flair = self.model(**inputs).logits_per_image[:, 0]
        maps = dense_maps(self.model, inputs["pixel_values"], inputs["input_ids"], kind=kind, upsample=True)[:, 0]
        order = flair.argsort(descending=True).tolist()
        rows = [[paths[candidates[k]].name, flair[k].item(), global_similarity[candidates[k]].item()] for k in order]
        gallery = [(overlay(shown_image(self.processor, inputs["pixel_values"][k]), maps[k]), paths[candidates[k]].name) for k in order]
        return table("search-results", ["image", "FLAIR logit", "global cosine"], rows), gallery


def build(model: FlairModel, processor: FlairProcessor, random_weights: bool) -> gr.Blocks:
    demo = Demo(model, processor)
    with gr.Blocks(title="FLAIR: what each caption looks at") as page:
        gr.Markdown("# FLAIR: fine-grained, text-conditioned image embeddings")
        if random_weights:
            gr.Markdown(RANDOM_BANNER, elem_id="random-banner")
        kinds = gr.Radio(["attention", "similarity"], value="attention", label="heatmap: pooling attention or patch similarity")
        with gr.Tab("Captions", id="captions"):
            with gr.Row():
                image = gr.Image(type="pil", label="image", elem_id="captions-image")
                text = gr.Textbox(lines=5, label="captions, one per line", elem_id="captions-text")
            run = gr.Button("Score captions", elem_id="captions-run")
            scores, maps = gr.HTML(elem_id="captions-output"), gr.Gallery(label="heatmaps", columns=4, elem_id="captions-maps")
            run.click(demo.captions, [image, text, kinds], [scores, maps])
        with gr.Tab("Classify", id="classify"):
            with gr.Row():
                image = gr.Image(type="pil", label="image", elem_id="classify-image")
                text = gr.Textbox(lines=5, label="class names, one per line", elem_id="classify-text")
            run = gr.Button("Classify", elem_id="classify-run")
            scores = gr.HTML(elem_id="classify-output")
            run.click(demo.classify, [image, text], scores)
        with gr.Tab("Segment", id="segment"):
            with gr.Row():
                image = gr.Image(type="pil", label="image", elem_id="segment-image")
                text = gr.Textbox(lines=5, label="class names, one per line", elem_id="segment-text")
            run = gr.Button("Segment", elem_id="segment-run")
            with gr.Row():
                mask, legend = gr.Image(label="classes", elem_id="segment-mask"), gr.HTML(elem_id="segment-output")
            run.click(demo.segment, [image, text], [mask, legend])
        with gr.Tab("Search", id="search"):
            with gr.Row():
                folder = gr.Textbox(label="folder of images on the server", elem_id="search-folder")
                uploads = gr.File(file_count="multiple", file_types=["image"], label="or upload images", elem_id="search-uploads")
            with gr.Row():
                query = gr.Textbox(label="query", elem_id="search-text")
                top = gr.Slider(1, 32, value=8, step=1, label="candidates re-ranked by FLAIR")
            run = gr.Button("Search", elem_id="search-run")
            results, maps = gr.HTML(elem_id="search-output"), gr.Gallery(label="heatmaps", columns=4, elem_id="search-maps")
            run.click(demo.search, [folder, uploads, query, top, kinds], [results, maps])
    return page


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("FLAIR_MODEL"), help="converted FLAIR directory or Hub id (default: $FLAIR_MODEL, else a tiny random model)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port (default: 7860)")
    args = parser.parse_args(argv)
    # 127.0.0.1 unless the host says otherwise (a Space sets GRADIO_SERVER_NAME=0.0.0.0)
    build(*load(args.model)).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), server_port=args.port)


if __name__ == "__main__":
    main()
