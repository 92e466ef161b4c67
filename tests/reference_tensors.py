"""The tensors of the reference data, computed by any FLAIR model (local or remote code) for one encoding.

Imports nothing from `flair_hf`, so the remote-code probe can use it in a process where `flair_hf` is blocked.
"""

import torch


def model_outputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> dict:
    """Every tensor named in the reference files (towers, embeddings, logits, pooling output and attentions)."""
    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True)
        vision, text = model.vision_model(pixel_values), model.text_model(input_ids)
        return {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "vision_pooled": vision.pooler_output,
            "vision_tokens": vision.last_hidden_state[:, 1:],
            "text_pooled": text.pooler_output,
            "text_tokens": text.last_hidden_state,
            "image_embeds": model.get_image_features(pixel_values).pooler_output,
            "image_token_embeds": model.get_image_token_features(pixel_values),
            "text_embeds": model.get_text_features(input_ids).pooler_output,
            "logits_as_clip_per_image": model.get_logits_as_clip(input_ids, pixel_values)[0],
            "logits_per_image": model.get_logits(input_ids, pixel_values)[0],
            "text_conditioned_image_embeds": model.get_text_conditioned_image_features(
                input_ids=input_ids, pixel_values=pixel_values
            ),
            "pooling_attention_mean": output.pooling_attentions.mean(1),
            "pooling_attention_heads": output.pooling_attentions,
        }
