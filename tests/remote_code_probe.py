"""Run in a subprocess: load a converted directory through the Auto classes with remote code only.

`flair_hf` is made unimportable first, so only the files in the directory can provide the classes. Prints a JSON
report with the FLAIR outputs for the given captions and images (saved to the output path as safetensors).
"""

import importlib.abc
import json
import sys


class _BlockFlairHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flair_hf" or name.startswith("flair_hf."):
            raise ImportError(f"{name} is blocked in this process")


sys.meta_path.insert(0, _BlockFlairHF())


def main(model_dir: str, inputs_json: str, output_path: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoProcessor

    try:
        import flair_hf  # noqa: F401

        blocked = False
    except ImportError:
        blocked = True
    inputs = json.loads(open(inputs_json).read())
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    encoding = processor(text=inputs["captions"], images=inputs["images"])
    with torch.no_grad():
        output = model(**encoding, output_attentions=True)
        text_outputs = model.text_model(encoding["input_ids"])
        vision_outputs = model.vision_model(encoding["pixel_values"])
    tensors = {
        "input_ids": encoding["input_ids"],
        "pixel_values": encoding["pixel_values"],
        "vision_pooled": vision_outputs.pooler_output,
        "vision_tokens": vision_outputs.last_hidden_state[:, 1:],
        "text_pooled": text_outputs.pooler_output,
        "text_tokens": text_outputs.last_hidden_state,
        "image_embeds": model.get_image_features(encoding["pixel_values"]),
        "image_token_embeds": model.get_image_token_features(encoding["pixel_values"]),
        "text_embeds": model.get_text_features(encoding["input_ids"]),
        "logits_per_image": output.logits_per_image,
        "logits_as_clip_per_image": output.logits_per_image_as_clip,
        "text_conditioned_image_embeds": model.get_text_conditioned_image_features(
            input_ids=encoding["input_ids"], pixel_values=encoding["pixel_values"]
        ),
        "pooling_attention_mean": output.pooling_attentions.mean(1),
        "pooling_attention_heads": output.pooling_attentions,
    }
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, output_path)
    classes = [type(config).__module__, type(model).__module__, type(processor).__module__]
    print(json.dumps({"flair_hf_blocked": blocked, "modules": classes}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
