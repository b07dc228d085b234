"""Every notebook in colab/ runs top to bottom on CPU (small setting); any cell error fails."""

import pathlib

import nbclient
import nbformat
import pytest

from tests.cpu_env import xla_flags

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"


# The sharding notebook is about meshes: it gets the 8 devices of a TPU host. The others run as on
# Colab's CPU runtime, on one device (on this CPU, 8 forced devices make each step slower).
@pytest.mark.parametrize(
    "name, devices", [("quickstart", 1), ("sharding", 8), ("extend", 1), ("finetune", 1)]
)
def test_notebook_runs_end_to_end(name, devices, tmp_path, data_dir, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", xla_flags(devices))
  monkeypatch.setenv("BIGJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)  # the session's prepared data sets
  # The notebooks' tempfile workdirs, removed with tmp_path
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError naming the failing cell
  outputs = "".join(
      o.get("text", "")
      for cell in notebook.cells
      if cell.cell_type == "code"
      for o in cell.get("outputs", [])
  )
  assert "Error" not in outputs
