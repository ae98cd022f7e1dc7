"""Every ```python example in the README runs."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    """The block runs without raising, to its end (it binds names there)."""
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert set(namespace) - {"__builtins__"}, "the example ran but defined nothing"


def test_readme_has_examples():
    assert len(BLOCKS) >= 3
