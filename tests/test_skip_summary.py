"""The test run ends with one line naming why tests skipped (tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def test_skips_are_summarized_by_reason(pytester: pytest.Pytester) -> None:
    """Under xdist too (as the suite runs by default): the reports reach the controller."""
    pytest.importorskip("xdist")
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    pytester.makepyfile(test_some="""
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_no_timm(i):
            pytest.skip("timm is not installed")

        @pytest.mark.skipif(True, reason="needs a CUDA GPU")
        def test_gpu():
            pass

        def test_runs():
            pass
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-n", "1")
    result.assert_outcomes(passed=1, skipped=4)
    result.stdout.fnmatch_lines(["skipped 4: 3 timm is not installed; 1 needs a CUDA GPU"])
