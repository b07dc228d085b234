"""Every notebook in colab/ runs top to bottom on CPU (small setting); any cell error fails."""

import pathlib

import nbclient
import nbformat
import pytest

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"


@pytest.mark.parametrize("name", ["quickstart", "sharding", "extend", "finetune"])
def test_notebook_runs_end_to_end(name, tmp_path, data_dir, monkeypatch):
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
