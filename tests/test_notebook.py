"""Reports in notebooks: HTML tables, `Report.plot()`, and `examples/notebook.ipynb` run by a real Jupyter kernel."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import relumon
from tests.helpers import MLP, kill_units, train_steps

ROOT = Path(__file__).resolve().parents[1]


def dead_report() -> relumon.Report:
    """act2 (12 units) dead; act1 with 10 of its 16 units dead."""
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    kill_units(model.fc1, list(range(10)))
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        train_steps(model, steps=2)
    return monitor.report()


def cells(row: str) -> list[str]:
    return re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)


def test_report_html_is_the_text_table_with_states_highlighted() -> None:
    report = dead_report()
    page = report._repr_html_()
    text = str(report).splitlines()
    header, *rows = re.findall(r"<tr[^>]*>.*?</tr>", page)
    # The same columns as str(report), whose header line splits on runs of two spaces.
    assert cells(header) == re.split(r"\s{2,}", text[1])
    assert [cells(r)[0] for r in rows] == ["act1", "act2"]
    act1, act2 = rows
    assert "class='half or more dead'" in act1 and "class='dead'" in act2
    assert cells(act2)[4:6] == ["12 of 12*", "100.0 %"]  # numbers with their units
    assert cells(act1)[4:6] == ["10 of 16", "62.5 %"]
    assert "window 0 (0-based)" in page and "L2 norm of dL/d(output) over the whole batch tensor" in page


def test_report_html_escapes_names_and_shows_nan_units_only_when_there_are_some() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with relumon.watch(model, measure_every=1) as monitor:
        model(torch.randn(2, 3)).sum().backward()
    assert "NaN units" not in monitor.report()._repr_html_()
    with relumon.watch(model, measure_every=1) as monitor:
        model(torch.full((2, 3), float("nan"))).sum().backward()
    assert "NaN units" in monitor.report()._repr_html_()
    layer = monitor.report(reset=False)[0]
    assert "<script>" not in relumon.LayerReport(**{**layer.__dict__, "name": "<script>"})._repr_html_()


def test_layer_report_html_lists_its_facts() -> None:
    act2 = dead_report()["act2"]
    page = act2._repr_html_()
    assert "call site act2 (ReLU)" in page and "background-color" in page  # highlighted as dead
    assert "12 of 12 (100.0 %)" in page and "`fc2` (Linear 16→12) feeds `act2`" in page


def test_report_plot_is_the_gradient_flow_figure() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    fig = dead_report().plot()
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["act1", "act2"]
    assert "over the batch tensor" in fig.axes[0].get_ylabel()


@pytest.mark.slow
def test_the_example_notebook_runs_in_a_real_kernel_and_shows_table_and_pictures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # A kernelspec of our own, so the kernel is this interpreter (the test venv), whatever else is installed.
    spec = tmp_path / "kernels" / "relumon-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "relumon test", "language": "python"}))
    manager = KernelManager(
        kernel_name="relumon-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)])
    )
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, km=manager, timeout=240, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("relumon-report" in page and "class='dead'" in page for page in html)  # the table, a dead row in it
    images = [o.data["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # report.plot() and the heatmap, inline without pyplot
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "DeadUnitsWarning" in streams
