"""The README stays true: every option is documented in its one table, and nothing else is."""

from __future__ import annotations

import re
from pathlib import Path

from django_socketmail.conf import OPTIONS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_options_table_lists_every_option_and_only_those() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \|", README.read_text(), flags=re.MULTILINE)
    assert rows == list(OPTIONS)


def test_defaults_in_the_table_match_the_code() -> None:
    text = README.read_text()
    for name, option in OPTIONS.items():
        row = re.search(rf"^\| `{name}` \|[^|]*(?:\\\|[^|]*)*\| `([^`]*)` \|", text, re.MULTILINE)
        assert row, name
        documented = row.group(1).replace('"', "'")
        assert documented == repr(option.default), (name, documented)
