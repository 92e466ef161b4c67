"""`flair-hf COMMAND ...`: the project's command-line tools under one name.

    flair-hf                       # the commands
    flair-hf convert --help        # = python conversion/convert_flair_to_hf.py --help
    flair-hf evaluate retrieval --help

The commands are the `flair_hf.commands` entry points of the installed distribution (name -> `module:main`; a dotted
name such as `evaluate.retrieval` is typed as two words), so the library names none of the applications it serves.
"""

import ast
import sys
from importlib import metadata
from importlib.util import find_spec

GROUP = "flair_hf.commands"


def commands() -> dict[str, metadata.EntryPoint]:
    """The installed commands, by the words that name them (`"evaluate retrieval"`)."""
    return {entry.name.replace(".", " "): entry for entry in metadata.entry_points(group=GROUP)}


def summary(entry: metadata.EntryPoint) -> str:
    """The first line of the command module's docstring, read without importing it."""
    origin = find_spec(entry.module).origin
    with open(origin, encoding="utf-8") as source:
        docstring = ast.get_docstring(ast.parse(source.read())) or ""
    return docstring.strip().splitlines()[0] if docstring.strip() else ""


def usage(known: dict[str, metadata.EntryPoint]) -> str:
    width = max(map(len, known), default=0)
    rows = "\n".join(f"  {name:<{width}}  {summary(entry)}" for name, entry in sorted(known.items()))
    return f"usage: flair-hf COMMAND [ARGS...]   (flair-hf COMMAND --help for its options)\n\ncommands:\n{rows}"


def resolve(argv: list[str], known: dict[str, metadata.EntryPoint]) -> tuple[str, list[str]]:
    """The longest run of leading words that names a command, and the arguments after it."""
    for words in range(min(len(argv), 2), 0, -1):
        name = " ".join(argv[:words])
        if name in known:
            return name, argv[words:]
    typed = " ".join(argv[:2])
    groups = sorted({name for name in known if name.startswith(f"{argv[0]} ")})
    hint = f": one of {', '.join(groups)}" if groups else ": run flair-hf for the list"
    raise SystemExit(f"error: flair-hf has no command {typed!r}{hint}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    known = commands()
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage(known))
        return 0
    name, arguments = resolve(argv, known)
    command = known[name].load()
    sys.argv[0] = f"flair-hf {name}"  # the command's argparse names itself so in its usage and errors
    result = command(arguments)
    return result if type(result) is int else 0


if __name__ == "__main__":
    sys.exit(main())
