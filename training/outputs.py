"""Output directories written whole: a run that fails or is stopped leaves nothing half-written behind."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(output: Path) -> Iterator[Path]:
    """A fresh `OUTPUT.partial` to write into; it becomes `output` (which may exist only as an empty directory) when
    the block ends, and is removed if the block raises."""
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if output.is_dir():
        output.rmdir()
    partial.rename(output)
