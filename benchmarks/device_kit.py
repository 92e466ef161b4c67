"""Wheels for running the GPU suite on a lent device machine, whose image cannot fetch anything.

    python benchmarks/device_kit.py [--dest .whl] [--python-version 3.12]

Walks flair-hf's runtime requirements (and theirs) as installed here, and downloads, for CPython on manylinux
x86-64, exactly the distributions the device image lacks or holds in a version a requirement rules out, at the
versions installed here (the ones CI tests). transformers is always carried, so the device runs the version CI
tests rather than the image's. The image's packages are listed in `DEVICE_IMAGE` (from the device tool's KINDS.md;
versions where a session saw them, None where unknown: those are assumed to fit). Checks that the wheels and the
working tree together stay well inside the 64 MiB a device call carries. `benchmarks/device_run.sh` installs them
there.
"""

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# the nvidia-h200 image (Python 3.12.3): packages with the versions a session saw, None where not read
DEVICE_IMAGE = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "onnx": "1.23.1", "onnxruntime": "1.30.0",
    "safetensors": "0.8.0", "sentence-transformers": "6.0.1", "tokenizers": "0.23.2", "torch": "2.11.0",
    "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
    **dict.fromkeys([
        "aiohttp", "aiosignal", "annotated-doc", "anyio", "attrs", "certifi", "charset-normalizer", "click", "filelock",
        "frozenlist", "fsspec", "h11", "hf-xet", "httpcore", "httpx", "idna", "jinja2", "markdown-it-py", "markupsafe",
        "mdurl", "mpmath", "multidict", "networkx", "packaging", "pandas", "pillow", "pip", "propcache", "psutil",
        "pyarrow", "pygments", "pytest", "python-dateutil", "pyyaml", "regex", "requests", "rich", "setuptools",
        "shellingham", "six", "sympy", "tqdm", "typer", "typing-extensions", "urllib3", "wheel", "xxhash", "yarl",
    ]),
}  # fmt: skip
ALWAYS_CARRY = ("transformers",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_MIB = 56  # of the 64 MiB a device call carries (tree + wheels), with room to spare


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(root: str, python_version: str) -> dict[str, list[Requirement]]:
    """Every distribution `root` needs on Linux x86-64 CPython `python_version` (no extras): name -> requirements on it."""
    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}  # fmt: skip
    needed, pending = {}, [root]
    while pending:
        for text in metadata.requires(pending.pop()) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            name = canonical(requirement.name)
            if name not in needed:
                pending.append(name)
            needed.setdefault(name, []).append(requirement)
    return needed


def to_carry(needed: dict[str, list[Requirement]]) -> dict[str, str]:
    """name -> version installed here, for what the image lacks, holds in an excluded version, or must be CI's."""
    carry = {}
    for name, requirements in sorted(needed.items()):
        image_version = DEVICE_IMAGE.get(name, "absent")
        fits = image_version is None or (
            image_version != "absent" and all(r.specifier.contains(image_version, prereleases=True) for r in requirements)
        )
        if name in ALWAYS_CARRY or not fits:
            carry[name] = metadata.version(name)
    return carry


def download(carry: dict[str, str], dest: Path, python_version: str) -> None:
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    for name, version in carry.items():
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                   python_version, "--implementation", "cp", *platforms, "-d", str(dest), f"{name}=={version}"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"error: no wheel of {name}=={version} for CPython {python_version} manylinux x86-64: {result.stderr.strip()[-300:]}")


def tree_bytes() -> int:
    """What a device call sends: tracked files and untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    return sum((ROOT / name).stat().st_size for name in names.stdout.split("\0") if name and (ROOT / name).is_file())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(ROOT / ".whl"), help="folder for the wheels (git-ignored; replaced)")
    parser.add_argument("--python-version", default="3.12", help="the device's Python (3.12 on nvidia-h200)")
    args = parser.parse_args(argv)
    carry = to_carry(requirement_closure("flair-hf", args.python_version))
    dest = Path(args.dest)
    staging = Path(tempfile.mkdtemp(prefix=".whl-", dir=dest.parent))
    try:
        download(carry, staging, args.python_version)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheels = sum(path.stat().st_size for path in dest.glob("*.whl"))
    total = wheels + (tree_bytes() if dest.resolve().is_relative_to(ROOT) else 0)
    print(f"carried: {', '.join(f'{n}=={v}' for n, v in carry.items())}")
    print(f"{len(carry)} wheels, {wheels / 2**20:.1f} MiB; with the working tree {total / 2**20:.1f} MiB (limit {LIMIT_MIB})")
    if total > LIMIT_MIB * 2**20:
        raise SystemExit(f"error: {total / 2**20:.1f} MiB would travel, over {LIMIT_MIB} MiB: carry less")
    return {"carried": carry, "wheel_mib": wheels / 2**20, "total_mib": total / 2**20}


if __name__ == "__main__":
    main()
