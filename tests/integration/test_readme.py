"""README.md as a newcomer pastes it: every ```python block, in order, in one namespace."""

import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_every_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the snippets write scan.json, report.html, ck/ ...
    namespace: dict = {"__name__": "readme"}
    seconds = []
    for i, code in enumerate(python_blocks(), start=1):
        start = time.perf_counter()
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        seconds.append(time.perf_counter() - start)
    with capsys.disabled():
        print("\nREADME blocks (s):", ", ".join(f"{s:.0f}" for s in seconds))
    for written in ("scan.json", "report.html", "paper.json", "ablation.json"):
        assert (tmp_path / written).is_file(), written
    assert namespace["table"].rows and namespace["row"].model
