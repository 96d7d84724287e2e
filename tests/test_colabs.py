"""The colabs run top to bottom on tiny workdirs, and are stored clean.

Each notebook is executed with nbclient in a fresh kernel of this test's own
interpreter (the venv), with its parameters overridden papermill-style: a
cell is injected after the last cell tagged "parameters". The quickstart
trains the tiny config in the notebook; inspect_run is opened on the tiny
study directory and on a single training workdir; report on the study. Each
must write non-blank PNGs, and none may import TensorFlow.
"""

from __future__ import annotations

import os
import sys

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from PIL import Image

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")
NOTEBOOKS = ("quickstart.ipynb", "inspect_run.ipynb", "report.ipynb")
CELL_TIMEOUT_S = 300


def kernel_manager() -> AsyncKernelManager:
  """A kernel of this interpreter, whatever kernel specs the machine has.

  With no kernel directories, 'python3' resolves to ipykernel's built-in
  spec, which launches `sys.executable` (not a `python3` found elsewhere).
  """
  return AsyncKernelManager(
      kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[])
  )


def execute(name: str, params: dict, timeout: int = CELL_TIMEOUT_S):
  """Runs colabs/<name> with `params` injected; returns the executed notebook."""
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert tagged, f"{name} has no cell tagged 'parameters'"
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  nb.cells.insert(
      tagged[-1] + 1,
      nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}),
  )
  nb.cells.append(
      nbformat.v4.new_code_cell(
          "import sys\n"
          f"assert sys.executable == {sys.executable!r}, sys.executable\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
      )
  )
  km = kernel_manager()
  client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": COLABS}})
  client.execute()
  return nb


def assert_pngs(out_dir: str, expected: int) -> list[str]:
  """At least `expected` PNGs in out_dir, each a sizeable, non-blank image."""
  files = sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))
  assert len(files) >= expected, files
  for f in files:
    with Image.open(os.path.join(out_dir, f)) as im:
      assert im.width >= 500 and im.height >= 300, (f, im.size)
      pixels = np.asarray(im.convert("L"), np.float64)
    assert pixels.var() > 0, f
    # Axes, text and data cover a fair part of the figure, not a few pixels.
    assert np.mean(pixels < 200) > 0.01, f
  return files


def test_kernel_is_this_interpreter():
  assert kernel_manager().kernel_spec.argv[0] == sys.executable


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
  # The first code cell holds the paths, so that a user changes only it.
  first = next(c for c in nb.cells if c.cell_type == "code")
  assert "parameters" in first.metadata.get("tags", [])


def test_quickstart_trains_and_plots(tmp_path, data_dir):
  workdir, out = tmp_path / "run", tmp_path / "png"
  execute(
      "quickstart.ipynb",
      {"WORKDIR": str(workdir), "DATA_DIR": data_dir, "OUT_DIR": str(out)},
  )
  assert os.path.exists(workdir / "stage_eval.jsonl")
  assert assert_pngs(str(out), 2) == ["quickstart_group_f1.png", "quickstart_nc_curves.png"]


def test_inspect_run_on_a_study(tiny_study, tmp_path):
  config, study_dir, _ = tiny_study
  out = tmp_path / "png"
  execute("inspect_run.ipynb", {"WORKDIR": study_dir, "OUT_DIR": str(out)})
  files = assert_pngs(str(out), 5)
  for attr in config.study.combos:  # curves of every combination
    assert f"curves_synthetic-{attr}.png" in files
  first = f"synthetic-{sorted(config.study.combos)[0]}"
  for kind in ("geometry", "flipped", "confusion"):
    assert any(f.startswith(f"{kind}_{first}_") for f in files), (kind, files)


def test_inspect_run_on_one_training_workdir(tiny_run, tmp_path):
  _, workdir, _ = tiny_run
  out = tmp_path / "png"
  execute(
      "inspect_run.ipynb",
      {"WORKDIR": workdir, "OUT_DIR": str(out), "MEMBER": "seed1_bias0.25",
       "SECOND_AXIS": "group", "MAX_SAMPLES": None},
  )  # fmt: skip
  files = assert_pngs(str(out), 4)
  assert f"geometry_{os.path.basename(workdir)}_seed1_bias0.25.png" in files


def test_report_rebuilds_figures(tiny_study, tmp_path):
  config, study_dir, _ = tiny_study
  out = tmp_path / "png"
  combo = f"synthetic-{config.study.combos[0]}"
  execute(
      "report.ipynb",
      {"STUDY_DIR": study_dir, "OUT_DIR": str(out), "COMBOS": [combo], "STAGES": ("final",)},
  )
  files = assert_pngs(str(out), 7)
  # The metric that summary.json does not keep came from metrics.jsonl.
  assert "curve_train_nc1_own_g1.png" in files
