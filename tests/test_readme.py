"""The Python examples of the README and of the docs it sends readers to run as written, and
print what the page shows under them ("prints:" followed by a text block); those that import
timm or transformers carry that marker and skip cleanly where it cannot be imported."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from blocks import import_timm, import_transformers

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "docs" / "api.md", ROOT / "docs" / "model.md"]
EXAMPLE = re.compile(r"```python\n(.*?)```\n(?:prints:\n```text\n(.*?)```)?", re.DOTALL)
OPTIONAL = {"timm": import_timm, "transformers": import_transformers}


def _needs(code: str) -> list[str]:
    """The optional packages an example imports."""
    return [m for m in OPTIONAL if re.search(rf"^\s*(import|from) {m}\b", code, re.MULTILINE)]


def _examples() -> list:
    out = []
    for page in PAGES:
        for i, (code, printed) in enumerate(EXAMPLE.findall(page.read_text())):
            out.append(pytest.param(page, code, printed, id=f"{page.stem}-{i}",
                                    marks=[getattr(pytest.mark, m) for m in _needs(code)]))
    return out


@pytest.mark.parametrize(("page", "code", "printed"), _examples())
def test_example_runs_and_prints_what_the_page_shows(page: Path, code: str, printed: str) -> None:
    for m in _needs(code):
        OPTIONAL[m]()  # skips (or, in CI's timm environment, fails) when it cannot be imported
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, str(page), "exec"), {"__name__": "readme_example"})  # noqa: S102
    if printed:
        assert stdout.getvalue() == printed, f"{page.name} shows other output than its example"


def test_readme_opens_with_install_main_job_and_test() -> None:
    """The first screen: what it is, the two install lines, the main job, the test command."""
    text = (ROOT / "README.md").read_text()
    heads = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert heads[:3] == ["Install", "The main job: dense vs pruned, side by side", "Test"]
    install = text.split("## Install")[1].split("```bash\n")[1].split("```")[0].splitlines()
    assert len(install) == 2 and "whl/cpu" in install[0] and "pip install ." in install[1]
    assert "python benchmarks/latency.py" in text and "pytest -q" in text
    assert "**Status.**" in text.split("## Install")[0]
    assert len(text.split()) < 1600


def test_every_page_has_examples() -> None:
    assert all(EXAMPLE.search(page.read_text()) for page in PAGES)
