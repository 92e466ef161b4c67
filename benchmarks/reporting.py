"""What every evaluation CLI writes: the results as JSON and the markdown table next to it (`.md`), also printed."""

import json
from pathlib import Path


def write_results(results, table: str, output) -> Path:
    """Write `results` to `output` (JSON) and `table` to the same name with `.md`; print the table and both paths."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    output.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return output
