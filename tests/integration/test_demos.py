"""The demo notebooks run top to bottom on SmolLM2, in a fresh kernel, as a reader would run them.

Every `demos/*.ipynb` is collected (a notebook added later runs too). Each executes with nbclient
in a new "python3" kernel (ipykernel's, whose `python` jupyter_client resolves to the interpreter
running pytest), with the working directory a temporary folder, so files a demo writes land
there. A failing cell fails the test with the notebook, the cell's number and source, and the
error.
"""

import sys
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.integration

DEMOS = sorted((Path(__file__).resolve().parents[2] / "demos").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
WHERE = "import sys, tl_spikesink; print(sys.prefix); print(tl_spikesink.__file__)"
"""Appended to each run (not to the file): which interpreter and package the kernel used."""


def test_there_are_demos():
    names = {p.name for p in DEMOS}
    assert {"quickstart.ipynb", "interventions.ipynb", "mechanism.ipynb"} <= names


@pytest.mark.parametrize("path", DEMOS, ids=[p.stem for p in DEMOS])
def test_demo_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    stored = [i for i, c in enumerate(nb.cells) if c.get("outputs") or c.get("execution_count")]
    assert not stored, f"{path.name}: cells {stored} hold outputs; clear them before committing"
    nb.cells.append(nbformat.v4.new_code_cell(WHERE))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError:
        pytest.fail(_failure(path, nb), pytrace=False)
    except nbclient.exceptions.CellTimeoutError:
        pytest.fail(f"{path.name}: a cell ran past {CELL_TIMEOUT_S} s", pytrace=False)
    print(f"{path.name}: {len(code)} code cells in {time.perf_counter() - t0:.1f} s")

    where = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    prefix, package = where.split()
    import tl_spikesink

    assert prefix == sys.prefix, f"the kernel ran {prefix}, not this interpreter ({sys.prefix})"
    assert Path(package) == Path(tl_spikesink.__file__), "the kernel imported another tl_spikesink"


def _failure(path, nb):
    """The notebook, cell and error of the first cell with an error output."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                trace = "\n".join(out.get("traceback", []))
                return (
                    f"{path.name}, cell {i} (execution {cell.get('execution_count')}) failed: "
                    f"{out['ename']}: {out['evalue']}\n--- cell source ---\n{cell.source}\n"
                    f"--- traceback ---\n{_plain(trace)}"
                )
    return f"{path.name}: execution failed, but no cell holds an error output"


def _plain(text):
    """The traceback without terminal colors."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)
