"""docs/configuration.md's key list ("## Every key") is what `fedpeft config` prints for the live
schema: every key, default and description. A key added without the docs fails here; fix it with
`.venv/bin/python scripts/config_docs.py`."""

from __future__ import annotations

import pytest

from fedpeft.cli import main
from scripts.config_docs import DOC, documented, split_doc


def _keys(text: str) -> list[str]:
    """'section.key' for every key line of a `fedpeft config` listing, in order."""
    keys, section = [], ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line.startswith("  ") and " = " in line:
            keys.append(f"{section}.{line.split(' = ', 1)[0].strip()}")
    return keys


def test_the_documented_keys_are_the_live_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    live = capsys.readouterr().out.rstrip("\n")
    docs = documented(split_doc(DOC.read_text())[1])
    live_keys, doc_keys = _keys(live), _keys(docs)
    assert len(live_keys) > 50  # the parser read the listing, not an empty block
    missing = [k for k in live_keys if k not in doc_keys]
    stale = [k for k in doc_keys if k not in live_keys]
    fix = "; run .venv/bin/python scripts/config_docs.py"
    assert not missing and not stale, f"not in the docs: {missing}, gone: {stale}{fix}"
    assert doc_keys == live_keys, f"the docs list the keys in another order{fix}"
    assert docs == live, f"defaults or descriptions differ from `fedpeft config`{fix}"


def test_the_key_parser_sees_sections_and_keys() -> None:
    text = ("[model]\n  name = 'x'  (str) the model\n  rank = 8  (int >= 1) r\n"
            "[eval]\n  every = 1  (int) n")
    assert _keys(text) == ["model.name", "model.rank", "eval.every"]
