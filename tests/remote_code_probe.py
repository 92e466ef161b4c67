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
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from reference_tensors import model_outputs

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
    tensors = model_outputs(model, encoding["input_ids"], encoding["pixel_values"])
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, output_path)
    classes = [type(config).__module__, type(model).__module__, type(processor).__module__]
    print(json.dumps({"flair_hf_blocked": blocked, "modules": classes}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
