"""What the benchmark scripts write: results as JSON and, for the evaluation CLIs, the markdown table next to it."""

import json
from pathlib import Path


def write_json(data, output) -> Path:
    """Write `data` as indented JSON to `output`, creating its folder."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2))
    return output


def write_results(results, table: str, output) -> Path:
    """Write `results` to `output` (JSON) and `table` to the same name with `.md`; print the table and both paths."""
    output = write_json(results, output)
    output.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return output
