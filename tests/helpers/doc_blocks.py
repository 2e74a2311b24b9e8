"""The executable procedures of the docs: fenced ```sh blocks marked with a comment line.

A block is marked by the line `<!-- procedure: NAME -->` right before its opening fence (blank lines
between them are allowed, nothing else):

    <!-- procedure: drain -->
    ```sh
    storyfarm drain --wait --timeout 600
    ```

`procedures(path)` returns {NAME: the block's text}. A marker not followed by a ```sh block, a
block that never closes, or a NAME used twice in one file is a ValueError naming the file and
line, so a broken marker fails the tests instead of silently dropping a procedure.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = re.compile(r"^\s*<!--\s*procedure:\s*([A-Za-z0-9][A-Za-z0-9_.-]*)\s*-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*(\w*)\s*$")


def procedures(path: str | Path) -> dict[str, str]:
    """{NAME: block text (its lines, ending in a newline)} for every marked block of a markdown file."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    found: dict[str, str] = {}
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if not marker:
            i += 1
            continue
        name, where = marker.group(1), f"{path}:{i + 1}"
        if name in found:
            raise ValueError(f"{where}: procedure {name!r} is marked twice")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = FENCE.match(lines[j]) if j < len(lines) else None
        if not fence or fence.group(2) not in ("sh", "bash"):
            raise ValueError(f"{where}: the marker of procedure {name!r} is not followed by a ```sh block")
        close = next((k for k in range(j + 1, len(lines)) if lines[k].strip() == fence.group(1)), None)
        if close is None:
            raise ValueError(f"{where}: the ```sh block of procedure {name!r} never closes")
        found[name] = "".join(line + "\n" for line in lines[j + 1:close])
        i = close + 1
    return found
