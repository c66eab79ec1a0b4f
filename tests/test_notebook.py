"""Execute examples/guided_sampling.ipynb end to end (in its fast mode) with nbclient."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # noqa: E402  (a dependency of nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "guided_sampling.ipynb"
# appended to the notebook in memory: which Python the kernel runs, and the numbers behind the table
PROBE = ("import json, sys\n"
         "print('FLOWALIGN_NB_PROBE ' + json.dumps({'prefix': sys.prefix, 'n': len(prompts), 'results': RESULTS}))")


def _same_python(exe: str) -> bool:
    """Whether ``exe`` (a kernelspec's argv[0]) runs this interpreter; jupyter_client swaps a bare ``python``,
    ``python3`` or ``python3.X`` for ``sys.executable``."""
    generic = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    return exe in generic or os.path.realpath(exe) == os.path.realpath(sys.executable)


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """The ``python3`` kernel if it runs this interpreter (ipykernel installs that kernelspec into sys.prefix);
    otherwise (e.g. a user-level python3 kernelspec for another Python) a kernelspec made for sys.executable."""
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if spec.argv and _same_python(spec.argv[0]):
            return KernelManager(kernel_name="python3")
    except NoSuchKernel:
        pass
    kdir = tmp_path / "kernels" / "flowalign-test"
    kdir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kdir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "flowalign test",
                                                   "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="flowalign-test", kernel_spec_manager=ksm)


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def test_guided_sampling_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWALIGN_NB_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    work = tmp_path / "work"
    work.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), "store the notebook without outputs"
    table_idx = [i for i, c in enumerate(nb.cells) if "results-table" in c.metadata.get("tags", [])]
    assert table_idx, "the results table cell is tagged 'results-table'"
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))

    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    probe = json.loads(_text(nb.cells[-1]).split("FLOWALIGN_NB_PROBE ", 1)[1])
    assert os.path.realpath(probe["prefix"]) == os.path.realpath(sys.prefix), "the kernel ran another Python"
    results, n = probe["results"], probe["n"]
    assert {"ODE", "ODE + Flow-NRG", "flow-SDE + Euphonium", "NRG clip + 5 smooth", "best-of-2 (clip)"} <= set(results)

    table = _text(nb.cells[table_idx[-1]])
    assert "shapes-geneval" in table and "shapes-clip" in table
    for name, r in results.items():
        assert 0.0 <= r["shapes-geneval"] <= 1.0
        row = next((line for line in table.splitlines() if re.split(r"\s{2,}", line)[0] == name), None)
        assert row is not None, f"no table row for {name!r} in:\n{table}"
        assert re.search(rf"\b{r['shapes-geneval']:.3f} \({r['passed']}/{n}\)", row), row
        assert f"{r['shapes-clip']:.2f}" in row, row

    n_figures = sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
                    for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert n_figures >= 4, f"expected the notebook's figures, got {n_figures}"
