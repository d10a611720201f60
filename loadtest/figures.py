"""Record benchmark figures in docs/benchmarks.json: one object per name, replaced on update."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BENCHMARKS_JSON = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.json"


def record(entries: list[dict[str, Any]], path: Path = BENCHMARKS_JSON) -> None:
    """Upsert entries by name; each needs name, value, unit, target, card, date, commit, command."""
    required = {"name", "value", "unit", "target", "card", "date", "commit", "command"}
    for entry in entries:
        missing = required - set(entry)
        if missing:
            raise ValueError(f"figure {entry.get('name')!r} lacks {sorted(missing)}")
    existing = json.loads(path.read_text()) if path.exists() else []
    by_name = {e["name"]: e for e in existing}
    for entry in entries:
        by_name[entry["name"]] = entry
    path.write_text(json.dumps(list(by_name.values()), indent=1) + "\n")
