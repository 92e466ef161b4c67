"""A FLAIR model with its processor: strings and images in, normalised embeddings and scores out."""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .modeling_flair import FlairModel
from .preprocessing import as_image_list, as_text_list
from .processing_flair import FlairProcessor


def load_failure(model_id, error: Exception) -> str:
    """One line for a command-line tool: why `model_id` did not load as a FLAIR model, and what to give instead."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"--model {model_id}: cannot load a FLAIR model ({reason}); give a converted FLAIR directory "
        "(conversion/convert_flair_to_hf.py) or a Hub id reachable from here"
    )


class FlairScorer:
    """`FlairModel` plus `FlairProcessor`, for scoring without handling tensors:

        scorer = FlairScorer.from_pretrained("flair-cc3m-recap-hf")
        scorer.score("puppy.jpg", ["a small white puppy", "a red ladybug"])["probs"]

    Images are PIL images, local file paths or `(H, W, 3)` uint8 arrays (no URLs: download first). The model may be
    any object with `FlairModel`'s methods (also one loaded with `trust_remote_code=True`)."""

    def __init__(self, model: FlairModel, processor: FlairProcessor):
        self.model, self.processor = model, processor

    @classmethod
    def from_pretrained(cls, path, **model_kwargs) -> "FlairScorer":
        """The model (in eval mode; `model_kwargs` go to `FlairModel.from_pretrained`) and the processor saved with it."""
        return cls(FlairModel.from_pretrained(path, **model_kwargs).eval(), FlairProcessor.from_pretrained(path))

    def _batched(self, items, batch_size: int, encode, description: str, show_progress_bar: bool) -> torch.Tensor:
        starts = tqdm(range(0, len(items), batch_size), desc=description, disable=not show_progress_bar)
        chunks = [F.normalize(encode(items[start : start + batch_size]).float(), dim=-1) for start in starts]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def encode_text(self, texts, batch_size: int = 256, show_progress_bar: bool = False) -> torch.Tensor:
        """L2-normalised global embeddings `(T, D)` (float32) of a string or a list of strings."""

        def encode(batch):
            return self.model.get_text_embeds(self.processor(text=batch)["input_ids"].to(self.model.device))

        return self._batched(as_text_list(texts), batch_size, encode, "encoding texts", show_progress_bar)

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64, show_progress_bar: bool = False) -> torch.Tensor:
        """L2-normalised global embeddings `(B, D)` (float32) of one image or a list."""

        def encode(batch):
            pixels = self.processor(images=batch)["pixel_values"].to(self.model.device, self.model.dtype)
            return self.model.get_image_embeds(pixels)

        return self._batched(as_image_list(images), batch_size, encode, "encoding images", show_progress_bar)

    @torch.no_grad()
    def score(self, images, texts) -> dict[str, torch.Tensor]:
        """FLAIR logits `(B, T)` of images against texts, with `probs` (softmax over the texts, as the zero-shot
        pipeline), `sigmoid_probs` (each pair on its own: FLAIR's training objective) and the global, CLIP-style
        `logits_as_clip`."""
        images, texts = as_image_list(images), as_text_list(texts)
        if not images or not texts:
            raise ValueError(f"score() got {len(images)} images and {len(texts)} texts: pass at least one of each")
        inputs = self.processor(text=texts, images=images)
        output = self.model(input_ids=inputs["input_ids"].to(self.model.device),
                            pixel_values=inputs["pixel_values"].to(self.model.device, self.model.dtype))  # fmt: skip
        logits = output.logits_per_image.float()
        return {"logits": logits, "probs": logits.softmax(dim=-1), "sigmoid_probs": torch.sigmoid(logits),
                "logits_as_clip": output.logits_per_image_as_clip.float()}  # fmt: skip


__all__ = ["FlairScorer", "load_failure"]
