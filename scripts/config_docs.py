"""Rewrite the key list in docs/configuration.md ("## Every key") from `fedpeft config`.

    .venv/bin/python scripts/config_docs.py           # rewrite the block
    .venv/bin/python scripts/config_docs.py --check   # exit 1 if the docs differ

tests/test_config_docs.py fails while the block differs from the live schema.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN = "<!-- begin: the output of `fedpeft config` (scripts/config_docs.py writes it) -->"
END = "<!-- end: the output of `fedpeft config` -->"


def config_output() -> str:
    from fedpeft.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["config"])
    return out.getvalue().rstrip("\n")


def split_doc(text: str) -> tuple[str, str, str]:
    """(before, block between the markers, after); the block is the fenced output."""
    head, sep, rest = text.partition(BEGIN + "\n")
    block, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{DOC}: the markers {BEGIN!r} / {END!r} are missing")
    return head + sep, block, sep2 + tail


def fenced(body: str) -> str:
    return f"```\n{body}\n```\n"


def documented(block: str) -> str:
    lines = block.strip("\n").splitlines()
    if len(lines) < 2 or lines[0] != "```" or lines[-1] != "```":
        raise SystemExit(f"{DOC}: the key list between the markers is not one fenced block")
    return "\n".join(lines[1:-1])


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    head, block, tail = split_doc(text)
    live = config_output()
    if "--check" in argv:
        same = documented(block) == live
        print("docs/configuration.md is up to date" if same else
              "docs/configuration.md differs from `fedpeft config`: run scripts/config_docs.py")
        return 0 if same else 1
    DOC.write_text(head + fenced(live) + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
