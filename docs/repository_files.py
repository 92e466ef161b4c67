"""mkdocs hook: the pages link to files of the repository beside `docs/` (`../benchmarks/results/x.png`), so that the
links work where the Markdown is read as is; in the site, each linked file is copied under `repository/` and the
links point there."""

import re
from pathlib import Path

from mkdocs.structure.files import File

LINK = re.compile(r"\]\(\.\./([^)#\s]+)")


def _linked_paths(docs_dir: Path) -> set[str]:
    return {match for page in docs_dir.glob("*.md") for match in LINK.findall(page.read_text())}


def on_files(files, config):
    docs_dir = Path(config["docs_dir"])
    for path in sorted(_linked_paths(docs_dir)):
        source = docs_dir.parent / path
        if source.is_file():  # a missing one stays a broken link, which strict mode reports
            files.append(File.generated(config, f"repository/{path}", abs_src_path=str(source)))
    return files


def on_page_markdown(markdown, page, config, files):
    return LINK.sub(lambda match: f"](repository/{match.group(1)}", markdown)
