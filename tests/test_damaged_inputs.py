"""Damaged or hostile data inputs, as a user meets them: a broken image, a link loop in a folder, a
damaged tokenizer model, a prepared data set that names code. Each is one line naming the file
(never a traceback) or is read right (never the same file twice); no data set runs code."""

import io
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from bigjax.data import files
from bigjax.data import pipeline
from bigjax.data import sources
from bigjax.data import tokenizers
from bigjax.errors import UserError
from tests.test_cli import _assert_one_line_error
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CNN = ["--model=cnn-small", "--batch_size=4", "--log_every=1", "--seed=0"]
TRAIN_PER_CLASS = 5  # and one validation image per class


def _run(module, *flags, cwd=REPO, timeout=300):
  env = cpu_env(PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, "-m", module, *flags],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def _png(label: int, rng) -> bytes:
  from PIL import Image

  pixels = np.clip(rng.normal(60 + 120 * label, 20, (8, 8)), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def clean_images(tmp_path_factory):
  """DIR/a, DIR/b of 8x8 grey PNGs, named so that each class has TRAIN_PER_CLASS train images and
  one validation image (the split is a hash of the path)."""
  root = tmp_path_factory.mktemp("clean_images")
  rng = np.random.default_rng(0)
  for label, name in enumerate("ab"):
    (root / name).mkdir()
    want = {False: TRAIN_PER_CLASS, True: 1}
    for i in range(1000):
      validation = files.is_validation(f"{name}/{i:03d}.png".encode())
      if want[validation]:
        want[validation] -= 1
        (root / name / f"{i:03d}.png").write_bytes(_png(label, rng))
      if not any(want.values()):
        break
  return root


@pytest.fixture
def images(tmp_path, clean_images):
  root = tmp_path / "images"
  shutil.copytree(clean_images, root)
  return root


def _second_batch_path(root) -> str:
  """A training image of the run's second batch (batch size 4, seed 0): the first is read in the
  main process for shapes, the rest by the loader (grain's threads, or its worker processes)."""
  train = files.open_split(f"imagefolder:{root}", "train")
  first_image = files.open_split(f"imagefolder:{root}", "train+validation")[0][
      "name"
  ]  # read when opening
  names = pipeline.train_batches(train, 4, seed=0)[1]["name"]
  return next(name.decode() for name in names if name != first_image)


@pytest.mark.parametrize("damage, workers", [("truncated", 1), ("text", 0)])
def test_a_damaged_image_is_one_line_naming_it(images, damage, workers):
  path = _second_batch_path(images)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2] if damage == "truncated" else b"notes, not an image\n")
  result = _run(
      "experiments.cnn",
      *SMALL_CNN,
      f"--dataset=imagefolder:{images}",
      "--num_steps=2",
      "--eval_every=2",
      f"--workdir={images.parent / 'run'}",
      f"--data_workers={workers}",
  )
  _assert_one_line_error(result, 1, f"{path} is not a readable image (")
  assert result.stderr.rstrip().endswith("remove or replace it") and "leaked" not in result.stderr


def test_image_bytes_overwritten_or_cut_are_a_user_error(tmp_path):
  data = _png(0, np.random.default_rng(1))
  damaged = {
      "cut.png": data[:60],
      "overwritten.png": data[:45] + b"\xff" * 16 + data[61:],
      "empty.png": b"",
      "notes.png": b"shopping list\n",
  }
  for name, content in damaged.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(
        UserError, match=r"^\S+ is not a readable image \(.*\); remove or replace it$"
    ) as error:
      files.decode_image(str(tmp_path / name))
    assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)


def _within(seconds: float, fn):
  """fn() run in a thread, so that a walk that never ends fails the test instead of hanging it."""
  result = []
  thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
  thread.start()
  thread.join(seconds)
  assert result, f"still running after {seconds} s"
  return result[0]


def _link_loops(root) -> None:
  """The tester's loops and a second way into one folder: none may add a file."""
  os.symlink(root, root / "a" / "loop")  # a/loop/a/loop/... and a/loop/b/...
  (root / "b" / "sub").mkdir()
  os.symlink(root / "b", root / "b" / "sub" / "up")  # back into its own class
  os.symlink("sub", root / "b" / "again")  # b/again/up/... is b/sub/up/...


def test_link_loops_in_an_image_folder_add_nothing_through_the_cli(images):
  _link_loops(images)
  # A one-output model stops the run at the class check, just after the counts are printed: the
  # counts are the point here, and training on them is tested elsewhere.
  # Glob's walk of these loops never ends
  result = _run(
      "experiments.cnn",
      *SMALL_CNN,
      f"--dataset=imagefolder:{images}",
      "--model_override=num_classes=1",
      f"--workdir={images.parent / 'run'}",
      timeout=120,
  )
  assert (
      f"imagefolder:{images}: {2 * TRAIN_PER_CLASS} train / 2 eval images" in result.stdout
  ), result.stderr
  _assert_one_line_error(result, 1, "has 2 classes but --model=cnn-small outputs 1")


def test_with_link_loops_each_image_is_in_one_split_once_with_its_own_label(images):
  real = {os.path.realpath(p): p.parent.name for p in images.glob("*/*.png")}
  _link_loops(images)
  spec = f"imagefolder:{images}"
  splits = _within(20, lambda: {split: files.open_split(spec, split) for split in files.SPLITS})
  seen = {}
  for split, source in splits.items():
    for i in range(len(source)):
      example = source[i]
      path = os.path.realpath(example["name"].decode())
      assert path not in seen, f"{path} is in {seen.get(path)} and {split}"
      seen[path] = split
      assert "ab"[example["label"]] == real[path]
  assert sorted(seen) == sorted(real)
  assert len(splits["validation"]) == 2


def test_a_file_in_two_class_folders_is_one_line_naming_both(images):
  os.symlink(images / "b", images / "a" / "also_b")
  result = _run(
      "experiments.cnn",
      *SMALL_CNN,
      f"--dataset=imagefolder:{images}",
      "--num_steps=1",
      f"--workdir={images.parent / 'run'}",
  )
  first_b = sorted(os.listdir(images / "b"))[0]
  _assert_one_line_error(
      result,
      1,
      f"{images}/a/also_b/{first_b} and {images}/b/{first_b} are one file, in "
      f"class folders 'a' and 'b', so it has no one label; remove the link "
      f"{images}/a/also_b",
  )


def test_text_globs_read_each_real_file_once_whatever_the_links(tmp_path):
  corpus = tmp_path / "corpus"
  (corpus / "notes").mkdir(parents=True)
  (corpus / "notes" / "one.txt").write_text("first line\nsecond line\n")
  (corpus / "two.txt").write_text("third line\n")
  os.symlink(corpus, corpus / "notes" / "loop")
  os.symlink(corpus, corpus / "notes" / "loop2")  # two loops in one folder: exponential for glob
  # A second way to one folder: its files under the first path
  os.symlink("notes", corpus / "also_notes")
  # A second name for one file: the first in sorted order names it
  os.symlink("two.txt", corpus / "three.txt")
  os.link(corpus / "two.txt", corpus / "zz_hard.txt")
  documents = _within(
      20, lambda: files.open_split(f"textfiles:{corpus}/**/*.txt", "train+validation")
  )
  names = sorted(documents[i]["name"].decode() for i in range(len(documents)))
  assert names == [f"{corpus}/also_notes/one.txt", f"{corpus}/three.txt"]
  assert files._open_text_files("textfiles", f"{corpus}/**/*.txt")[1] == [
      b"also_notes/one.txt",
      b"three.txt",
  ]
  lines = _within(20, lambda: files.open_split(f"textlines:{corpus}/**/*.txt", "train+validation"))
  assert sorted(lines[i]["text"] for i in range(len(lines))) == [
      b"first line",
      b"second line",
      b"third line",
  ]


def _trained_model(path) -> bytes:
  documents = [
      f"Document {i}: the quick brown fox jumps over the lazy dog.\n".encode() * 30
      for i in range(20)
  ]
  tokenizers.train_sentencepiece(documents, 300, str(path))
  return path.read_bytes()


def test_a_damaged_tokenizer_model_is_one_line_naming_it(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(4):
    (corpus / f"doc{i}.txt").write_text(
        f"Document {i}: the quick brown fox jumps over the lazy dog. " * 20
    )
  workdir = tmp_path / "run"
  workdir.mkdir()
  model = workdir / tokenizers.MODEL_FILE
  model.write_bytes(_trained_model(tmp_path / "good.model")[:2000])  # cut short, as by a full disk
  result = _run(
      "experiments.transformer",
      f"--dataset=textfiles:{corpus}/*.txt",
      f"--workdir={workdir}",
      "--tokenizer=spm:300",
      "--model=transformer-tiny",
      "--seq_len=32",
      "--batch_size=8",
      "--num_steps=1",
      "--eval_split=train",
  )
  _assert_one_line_error(result, 1, f"{model} is damaged (")
  assert "restore it from a copy" in result.stderr and "a new --workdir" in result.stderr
  for content in (b"", b"garbage" * 100):
    model.write_bytes(content)
    with pytest.raises(UserError, match="is damaged .* restore it from a copy"):
      tokenizers.open_tokenizer("spm:300", str(workdir))


def _copy_prepared(data_dir, to, name) -> str:
  """sklearn_digits as prepared in `data_dir`, copied into `to` under another name, as a data set
  prepared elsewhere arrives (TFDS reads an unregistered name from its metadata alone)."""
  builder = sources.open_builder("sklearn_digits", data_dir)
  shutil.copytree(os.path.dirname(builder.data_dir), os.path.join(to, name))
  return os.path.join(to, name, os.path.basename(builder.data_dir))


def test_a_data_set_naming_a_feature_class_of_its_own_runs_no_code(tmp_path, data_dir):
  version_dir = _copy_prepared(data_dir, str(tmp_path / "data"), "shared_digits")
  path = os.path.join(version_dir, "features.json")
  with open(path) as f:
    features = json.load(f)
  features["featuresDict"]["features"]["label"]["pythonClassName"] = "evil_module.Feature"
  with open(path, "w") as f:
    json.dump(features, f)
  (tmp_path / "evil_module.py").write_text("open('IMPORTED', 'w').close()\n")
  result = _run(
      "experiments.cnn",
      *SMALL_CNN,
      "--dataset=shared_digits",
      f"--data_dir={tmp_path / 'data'}",
      f"--workdir={tmp_path / 'run'}",
      "--num_steps=1",
      cwd=str(tmp_path),
  )
  assert not (tmp_path / "IMPORTED").exists()
  _assert_one_line_error(
      result,
      1,
      f"{path} names the feature class 'evil_module.Feature', which is neither "
      "TFDS's own nor imported already: bigjax will not import code named by a "
      "data set",
  )


def test_only_feature_classes_already_defined_pass_anywhere_in_the_metadata(tmp_path, data_dir):
  version_dir = _copy_prepared(data_dir, str(tmp_path), "copied_digits")
  builder = sources.open_builder("copied_digits", str(tmp_path))  # an untouched copy reads as it is
  assert builder.info.splits["train"].num_examples == 1438
  path = os.path.join(version_dir, "dataset_info.json")
  with open(path) as f:
    info = json.load(f)
  info["features"] = {"featuresDict": {"features": {"x": {"pythonClassName": "their_code.Thing"}}}}
  with open(path, "w") as f:
    json.dump(info, f)
  with pytest.raises(
      UserError, match=r"dataset_info.json names the feature class 'their_code.Thing'"
  ):
    sources.open_builder("copied_digits:1.0.0", str(tmp_path))
  with open(path, "w") as f:
    f.write('{"name": "copied_digits", ')  # cut short
  with pytest.raises(
      UserError, match=r"dataset_info.json cannot be read \(.*\); restore the data set's files"
  ):
    sources.open_builder("copied_digits", str(tmp_path))
