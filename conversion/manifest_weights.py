"""The deterministic full-size weights recipe of the reference data (see tests/fixtures/README.md)."""

import json
import math

import numpy as np
import torch


def manifest_state_dict(manifest_path, seed: int = 1000) -> dict[str, torch.Tensor]:
    """Original-layout ViT-B-16-FLAIR state dict with the recipe's weights for `seed`."""
    entries = json.loads(open(manifest_path).read())["state_dict"]
    tensors = {}
    for index, entry in enumerate(entries):
        name, shape = entry["name"], tuple(entry["shape"])
        z = np.random.default_rng(seed + index).standard_normal(size=shape, dtype=np.float32)
        if name == "logit_scale":
            value = np.full(shape, math.log(10), dtype=np.float32)
        elif name == "logit_bias":
            value = np.full(shape, -2.5, dtype=np.float32)
        elif len(shape) == 1 and name.endswith(".weight"):
            value = 1 + 0.1 * z
        elif len(shape) == 1 and "bias" in name.rsplit(".", 1)[-1]:
            value = 0.05 * z
        else:
            fan_in = math.prod(shape[1:]) if len(shape) >= 2 else shape[0]
            value = z / np.float32(math.sqrt(fan_in))
        tensors[name] = torch.from_numpy(np.array(value, dtype=np.float32))
    return tensors
