"""The README's Python examples run as written (those that import timm or transformers carry
that marker and skip cleanly where it cannot be imported)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from blocks import import_timm, import_transformers

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
OPTIONAL = {"timm": import_timm, "transformers": import_transformers}


def _needs(code: str) -> list[str]:
    """The optional packages a block imports."""
    return [m for m in OPTIONAL if re.search(rf"^\s*(import|from) {m}\b", code, re.MULTILINE)]


@pytest.mark.parametrize("code", [
    pytest.param(b, id=f"block{i}", marks=[getattr(pytest.mark, m) for m in _needs(b)])
    for i, b in enumerate(BLOCKS)])
def test_readme_example_runs(code):
    for m in _needs(code):
        OPTIONAL[m]()  # skips (or, in CI's timm environment, fails) when it cannot be imported
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})  # noqa: S102


def test_readme_has_examples():
    assert len(BLOCKS) >= 2
