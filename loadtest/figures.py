"""Record benchmark figures in docs/benchmarks.json: one object per name, replaced on update.

Every benchmark script stamps its figures with `current_commit()` and merges them with
`record()`, so the file has one writer and one notion of "which code was measured".
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_JSON = ROOT / "docs" / "benchmarks.json"


def current_commit() -> str:
    """Short commit of the measured tree, with "+uncommitted" when it has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")


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
