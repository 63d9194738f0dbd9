"""Write the operators table of docs/operators.md from the descriptors (``engine.ops.params.OPS``).

    python -m engine.ops.docs           # rewrite the table between the markers
    python -m engine.ops.docs --check   # exit 1 if the page's table is stale

Torch-free: it reads only the descriptors.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.ops.params import operators_table_markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "operators.md"
BEGIN = "<!-- operators table: generated from engine/ops/params.py by `python -m engine.ops.docs`; do not edit -->\n"
END = "<!-- end of the operators table -->\n"
REGENERATE = "python -m engine.ops.docs"


def page_table(text: str) -> str:
    """The table between the markers of the page's `text` (ValueError if they are missing)."""
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"docs/operators.md lacks the markers {BEGIN.strip()!r} ... {END.strip()!r}")
    return text[start + len(BEGIN):stop]


def with_table(text: str, table: str | None = None) -> str:
    """`text` with the table between the markers replaced by `table` (default: the generated one)."""
    table = operators_table_markdown() if table is None else table
    start, stop = text.find(BEGIN), text.find(END)
    page_table(text)  # the markers exist
    return text[:start + len(BEGIN)] + table + text[stop:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = PAGE.read_text(encoding="utf-8")
    fresh = with_table(text)
    if "--check" in argv:
        if fresh != text:
            print(f"{PAGE}: the operators table is stale — run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        PAGE.write_text(fresh, encoding="utf-8")
        print(f"{PAGE}: operators table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
