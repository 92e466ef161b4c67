"""Run the README's code blocks as written, with the model name swapped for a local test model."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MODEL = '"flair-cc3m-recap-hf"'


def readme_python_block(marker: str) -> str:
    """The first ```python block of the README that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(block for block in blocks if marker in block)


def run_readme_python(marker: str, model_dir, tmp_path, epilogue: str = "") -> str:
    """Run the block with `model_dir` in place of the README's model name (offline, fresh modules cache); stdout."""
    code = readme_python_block(marker).replace(README_MODEL, repr(str(model_dir))) + epilogue
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
