"""Data sets by name and the user's own files: TFDS builders prepared into a temporary --data_dir,
text files and image folders, each trained on through the CLI; missing ones are one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax import metrics
from bigjax.data import files
from bigjax.data import lm
from bigjax.data import sources
from bigjax.errors import UserError
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BigjaxTestShapes(tfds.core.GeneratorBasedBuilder):
  """A real TFDS builder whose features are not named image/label/text: 8x8 grey squares whose
  brightness gives the class (0, 1, 2), with a caption."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.2.0": "test data"}

  def _info(self) -> tfds.core.DatasetInfo:
    # Built in code: a builder outside a package has no metadata files for TFDS to read.
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "picture": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "kind": tfds.features.ClassLabel(num_classes=3),
                "caption": tfds.features.Text(),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 96), "test": self._generate_examples(1, 24)}

  def _generate_examples(self, seed, count):
    rng = np.random.default_rng(seed)
    for i in range(count):
      kind = i % 3
      picture = np.clip(rng.normal(60 + 70 * kind, 20, (8, 8, 1)), 0, 255).astype(np.uint8)
      yield i, {"picture": picture, "kind": kind, "caption": f"square {i} of kind {kind}\n" * 3}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("shapes_data"))
  BigjaxTestShapes(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def _run(module, *flags):
  env = cpu_env()
  return subprocess.run(
      [sys.executable, "-m", module, *flags],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


SMALL_CNN = [
    "--model=cnn-small",
    "--batch_size=16",
    "--num_steps=4",
    "--log_every=2",
    "--eval_every=4",
    "--learning_rate=3e-3",
    "--warmup_steps=1",
]


def test_a_prepared_tfds_data_set_trains_through_the_cli_by_name_version_and_slices(
    tmp_path, shapes_dir
):
  result = _run(
      "experiments.cnn",
      *SMALL_CNN,
      "--dataset=bigjax_test_shapes:1.2.0",
      f"--data_dir={shapes_dir}",
      f"--workdir={tmp_path}",
      "--image_key=picture",
      "--label_key=kind",
      "--train_split=train[:75%]",
      "--eval_split=train[75%:]+test",
      "--data_workers=0",
  )
  assert result.returncode == 0, result.stderr
  assert "bigjax_test_shapes:1.2.0: 72 train / 48 eval images" in result.stdout
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["eval_loss"])


def test_text_features_by_another_name(shapes_dir):
  windows = lm.open_windows("bigjax_test_shapes", "test[:2]", 8, shapes_dir, text_key="caption")
  documents = windows.stream.tobytes().split(b"\0")
  assert len(documents) == 3 and documents[2] == b""  # two documents, each ended by the separator
  for document in documents[:2]:
    line = document.splitlines(keepends=True)[0]
    assert line.startswith(b"square ") and document == line * 3
  assert sources.num_classes("bigjax_test_shapes", "kind", shapes_dir) == 3
  with pytest.raises(UserError, match=r"has none of the text features .* --text_key"):
    lm.open_windows("bigjax_test_shapes", "test", 8, shapes_dir)


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_a_missing_data_set_version_or_split_is_one_line_naming_what_where_and_how(
    shapes_dir, tmp_path
):
  with pytest.raises(UserError) as missing:
    sources.load_source("bigjax_no_such_set", "train", str(tmp_path))
  assert _one_line(missing).startswith(
      f"data set 'bigjax_no_such_set' is not prepared in {tmp_path}"
  )
  assert f"`tfds build bigjax_no_such_set --data_dir={tmp_path} --file_format=array_record`" in str(
      missing.value
  )
  with pytest.raises(UserError) as version:
    sources.load_source("bigjax_test_shapes:1.0.0", "train", shapes_dir)
  assert "holds only bigjax_test_shapes/1.2.0" in _one_line(version)
  assert "`tfds build bigjax_test_shapes:1.0.0 --data_dir=" in str(version.value)
  with pytest.raises(UserError) as split:
    sources.load_source("bigjax_test_shapes", "validation", shapes_dir)
  assert "has no split 'validation'" in _one_line(split) and "train (96), test (24)" in str(
      split.value
  )
  assert "`tfds build bigjax_test_shapes --data_dir=" in str(split.value)
  with pytest.raises(UserError, match="has no split 'train\\[:150%\\]'"):
    sources.load_source("bigjax_test_shapes", "train[:150%]", shapes_dir)


def _write_class_images(root, counts):
  from PIL import Image

  rng = np.random.default_rng(0)
  for label, (name, count) in enumerate(counts.items()):
    os.makedirs(root / name)
    for i in range(count):
      pixels = np.clip(rng.normal(50 + 80 * label, 25, (8, 8)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels, mode="L").save(root / name / f"{name}_{i:03d}.png")


def test_an_image_folder_trains_through_the_cli_with_a_worker_process(tmp_path):
  root = tmp_path / "images"
  _write_class_images(root, {"cat": 40, "dog": 40, "owl": 40})
  validation = files.open_split(f"imagefolder:{root}", "validation")
  assert 1 <= len(validation) <= 20  # about 5% by hash
  result = _run(
      "experiments.cnn",
      *SMALL_CNN,
      f"--dataset=imagefolder:{root}",
      f"--workdir={tmp_path / 'run'}",
      "--data_workers=1",
      "--checkpoint_every=2",
  )
  assert result.returncode == 0, result.stderr
  assert f"{120 - len(validation)} train / {len(validation)} eval images" in result.stdout
  assert metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 4
  assert "Traceback" not in result.stderr and "leaked" not in result.stderr


def test_image_folder_examples_and_hash_split(tmp_path):
  _write_class_images(tmp_path, {"a": 30, "b": 30})
  everything = files.open_split(f"imagefolder:{tmp_path}", "train+validation")
  train = files.open_split(f"imagefolder:{tmp_path}", "train")
  assert len(everything) == 60 and len({everything[i]["name"] for i in range(60)}) == 60
  example = train[0]
  assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
  assert example["label"] == (0 if b"/a/" in example["name"] else 1)
  train_names = {train[i]["name"] for i in range(len(train))}
  for i in range(60):
    name = everything[i]["name"]
    assert files.is_validation(os.path.relpath(name.decode(), tmp_path).encode()) == (
        name not in train_names
    )
  assert sources.num_classes(f"imagefolder:{tmp_path}", "label") == 2
  with pytest.raises(UserError, match="want one sub-folder per class"):
    files.open_split(f"imagefolder:{tmp_path / 'a'}", "train")


def test_text_lines_are_documents_and_repeated_lines_share_a_split(tmp_path):
  (tmp_path / "one.txt").write_bytes(b"alpha\n\nbeta\r\n  \ngamma")
  (tmp_path / "two.txt").write_bytes(b"alpha\ndelta\n")
  spec = f"textlines:{tmp_path}/*.txt"
  everything = files.open_split(spec, "train+validation")
  assert sorted(everything[i]["text"] for i in range(len(everything))) == [
      b"alpha",
      b"alpha",
      b"beta",
      b"delta",
      b"gamma",
  ]
  train = files.open_split(spec, "train")
  assert sorted(train[i]["text"] for i in range(len(train))) == sorted(
      everything[i]["text"]
      for i in range(len(everything))
      if not files.is_validation(everything[i]["text"])
  )
  with pytest.raises(UserError, match="matches no files"):
    files.open_split(f"textlines:{tmp_path}/*.md", "train")


def test_an_offline_data_set_is_built_locally_and_says_nothing_is_downloaded(tmp_path, capsys):
  builder = sources.open_builder("sklearn_digits", str(tmp_path))
  assert (
      builder.info.splits["train"].num_examples + builder.info.splits["test"].num_examples == 1797
  )
  printed = capsys.readouterr().out
  assert "preparing sklearn_digits in" in printed and "nothing is downloaded" in printed
  assert "Downloading" not in printed
