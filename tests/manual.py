"""The user's manual (README.md and docs/*.md) as the tests read it: pages, sections, code blocks."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = '"demo/flair-fashion-mosaics"'
PAGES = ["README.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))]


def page(name: str) -> str:
    """The text of `README.md` or of `docs/<name>`."""
    return (ROOT / (name if name == "README.md" else f"docs/{name}")).read_text()


def section(name: str, heading: str) -> str:
    """The section `## heading` of a page, up to the next `## ` heading."""
    text = page(name)
    assert f"## {heading}\n" in text, f"{name} has no section '## {heading}'"
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced blocks of `language` in `text`, indented ones (in list items) included, dedented."""
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```", text, flags=re.S | re.M)
    return [re.sub(rf"(?m)^{indent}", "", block) for indent, block in blocks]


def python_block(name: str, marker: str) -> str:
    """The first ```python block of a page that contains `marker`."""
    return next(block for block in code_blocks(page(name), "python") if marker in block)


def workdir(tmp_path) -> Path:
    """A fresh directory holding links to the repository's folders, where the manual's commands run as written and
    write their `out/`, `data/` and `runs/` apart from the repository."""
    directory = tmp_path / "work"
    directory.mkdir()
    for name in ("benchmarks", "conversion", "demo", "src", "tests", "training"):
        (directory / name).symlink_to(ROOT / name)
    return directory


def run_command(command: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    """One `python ...` or `flair-hf ...` line of the manual, run as written with this interpreter (or the command
    installed beside it), offline; it must succeed."""
    words = shlex.split(command)
    program = {"python": sys.executable, "flair-hf": str(Path(sys.executable).parent / "flair-hf")}[words[0]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([program, *words[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    return result


def bash_commands(text: str) -> list[str]:
    """The command lines of a text's ```bash blocks, continuation lines joined, comments dropped."""
    lines = [line for block in code_blocks(text, "bash") for line in re.sub(r"\\\n\s*", "", block).splitlines()]
    return [line.split("  #", 1)[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def run_python(code: str, tmp_path, cwd=ROOT) -> str:
    """Run `code` (from the repository root unless told), offline, with a fresh remote-code cache; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
