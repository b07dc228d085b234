import numpy as np
import pytest

from bigjax.data import lm
from bigjax.data import mixture
from bigjax.data import pipeline
from bigjax.data import python_text
from bigjax.data import sources
from bigjax.errors import UserError


def test_corpus_splits_are_disjoint_and_hold_every_stdlib_file(data_dir):
  train = sources.load_source("python_stdlib_text", "train", data_dir)
  validation = sources.load_source("python_stdlib_text", "validation", data_dir)
  train_names = {train[i]["name"].decode() for i in range(len(train))}
  validation_names = {validation[i]["name"].decode() for i in range(len(validation))}
  assert not train_names & validation_names
  assert train_names | validation_names == {p.name for p in python_text.stdlib_sources()}
  assert len(validation_names) >= 3 and len(train_names) > 10 * len(validation_names)


def test_examples_are_the_files_bytes(data_dir):
  validation = sources.load_source("python_stdlib_text", "validation", data_dir)
  by_name = {p.name: p for p in python_text.stdlib_sources()}
  example = validation[0]
  assert example["bytes"].tobytes() == by_name[example["name"].decode()].read_bytes()


def test_token_stream_separates_documents():
  source = [{"bytes": np.frombuffer(b"ab", np.uint8)}, {"bytes": np.frombuffer(b"cde", np.uint8)}]
  np.testing.assert_array_equal(lm.token_stream(source), [97, 98, 0, 99, 100, 101, 0])


def test_windows_overlap_by_one_token_so_every_target_appears_once():
  windows = lm.TokenWindows(np.arange(11, dtype=np.uint8), seq_len=3)
  assert len(windows) == 3
  got = [windows[i]["tokens"].tolist() for i in range(len(windows))]
  assert got == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def test_train_batches_are_seeded_and_resume_from_iterator_state():
  windows = lm.TokenWindows(np.arange(1000, dtype=np.uint8) % 251, seq_len=7)
  a = iter(pipeline.train_batches(windows, 4, seed=1))
  first = [next(a)["tokens"] for _ in range(5)]
  state = a.get_state()
  expected_next = [next(a)["tokens"] for _ in range(3)]
  b = iter(pipeline.train_batches(windows, 4, seed=1))
  b.set_state(state)
  for want in expected_next:
    np.testing.assert_array_equal(next(b)["tokens"], want)
  c = iter(pipeline.train_batches(windows, 4, seed=2))
  assert not np.array_equal(next(c)["tokens"], first[0])
  assert first[0].shape == (4, 8) and first[0].dtype == np.int32


def test_the_data_identity_holds_what_changes_the_batches_and_not_who_reads_them(monkeypatch):
  """What a checkpoint saves beside its position, for a resume to refuse other data: the same for
  every process of any count and for any workers, other for another seed, batch size, example
  (another --seq_len or data set), mixture weight or mixed source, however small its weight."""
  windows = lm.TokenWindows(np.arange(1000, dtype=np.uint8) % 251, seq_len=7)
  other_windows = lm.TokenWindows(np.arange(1000, dtype=np.uint8) % 241, seq_len=7)

  def loader(source=windows, batch_size=4, seed=1, workers=0, process=(0, 1)):
    monkeypatch.setattr(pipeline.jax, "process_index", lambda: process[0])
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: process[1])
    return pipeline.train_batches(source, batch_size, seed=seed, workers=workers)

  def difference(saved_loader, resumed_loader):
    resumed = iter(resumed_loader)
    resumed.set_state(iter(saved_loader).get_state())
    return resumed.restored_data_difference()

  def mixture_of(spec, *sources):
    return mixture.Mixture(sources, mixture.parse(spec))

  want = loader()
  second_of_two = loader(process=(1, 2))
  assert not np.array_equal(second_of_two[0]["tokens"], want[0]["tokens"][:2])  # other rows
  for same in (second_of_two, loader(workers=2), loader()):
    assert difference(want, same) is None
  assert "first training examples differ" in difference(want, loader(seed=2))
  assert "first training examples differ" in difference(
      want, loader(lm.TokenWindows(np.arange(1000, dtype=np.uint8) % 251, seq_len=6))
  )
  assert difference(want, loader(batch_size=8)) == (
      "its global batch size was 4, these flags give 8 (--batch_size)"
  )
  mixed = loader(mixture_of("mix:a@97,b@3", windows, windows))
  assert difference(mixed, loader(mixture_of("mix:a@97,b@3", windows, windows))) is None
  assert "mixture" in difference(mixed, loader(mixture_of("mix:a@90,b@10", windows, windows)))
  # A 3% source never lands among the first examples of the mixed order; its own are checked.
  swapped = loader(mixture_of("mix:a@97,b@3", windows, other_windows))
  assert "a source of its mixture" in difference(mixed, swapped)

  resumed = iter(loader())
  resumed.set_state({"next_batch": 3})  # saved before checkpoints held the identity: not judged
  assert resumed.restored_data_difference() is None
  state = iter(loader(seed=2)).get_state()
  resumed.set_state({**state, "data": {**state["data"], "version": 0}})  # another version's
  assert resumed.restored_data_difference() is None


def test_eval_batches_cover_every_window_once_with_padding_weights():
  windows = lm.TokenWindows(np.arange(100, dtype=np.uint8), seq_len=9)  # 11 windows
  batches = pipeline.eval_batches(windows, 4, max_batches=0)
  assert len(batches) == 3
  weights = np.concatenate([b["weights"] for b in batches])
  assert weights.sum() == 11 and len(weights) == 12
  starts = [int(t[0]) for b in batches for t, w in zip(b["tokens"], b["weights"]) if w == 1]
  assert sorted(starts) == [9 * i for i in range(11)]


def test_eval_sample_is_fixed():
  windows = lm.TokenWindows(np.arange(250, dtype=np.uint8), seq_len=4)
  a = pipeline.eval_batches(windows, 4, max_batches=2)
  b = pipeline.eval_batches(windows, 4, max_batches=2)
  assert len(a) == 2
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_missing_dataset_names_the_directory_and_the_build_command(tmp_path):
  with pytest.raises(UserError, match=rf"'mnist' is not prepared in {tmp_path}.*tfds build mnist"):
    sources.load_source("mnist", "train", str(tmp_path))


def test_unknown_dataset_lists_the_offline_ones(tmp_path):
  with pytest.raises(
      UserError, match="'no_such_set' is not prepared.*python_stdlib_text.*tfds build no_such_set"
  ):
    sources.load_source("no_such_set", "train", str(tmp_path))


def test_too_long_windows_are_a_user_error(data_dir):
  with pytest.raises(UserError, match="too few for one window"):
    lm.open_windows("python_stdlib_text", "validation", 10_000_000, data_dir)


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
@pytest.mark.parametrize("suffix, longest", [("", 16), ("_20", 20)])
def test_synthetic_letter_tasks_have_the_known_answers(task, suffix, longest, data_dir):
  source = sources.load_source(f"synthetic_sequences/{task}{suffix}", "test", data_dir)
  assert len(source) == 1_000
  lengths = set()
  for i in range(len(source)):
    example = source[i]
    x, y = example["inputs"], example["targets"]
    assert set(x) <= set(b"abcdefghijklmnopqrstuvwxyz")
    lengths.add(len(x))
    want = {"copy": x, "reverse": x[::-1], "sort": bytes(sorted(x))}[task]
    assert y == want
  assert lengths == set(range(1, longest + 1))  # every length up to the longest, none beyond


def test_synthetic_addition_is_correct(data_dir):
  source = sources.load_source("synthetic_sequences/add", "train", data_dir)
  for i in range(100):
    a, b = source[i]["inputs"].decode().split("+")
    assert int(source[i]["targets"]) == int(a) + int(b)


def test_synthetic_data_set_needs_a_task(data_dir):
  with pytest.raises(UserError, match="synthetic_sequences/copy, synthetic_sequences/reverse"):
    sources.load_source("synthetic_sequences", "train", data_dir)


def test_prompt_targets_mask_only_the_answer():
  pairs = lm.PromptTargets([{"inputs": b"ab", "targets": b"ba"}], seq_len=8)
  example = pairs[0]
  assert example["tokens"].tolist() == [97, 98, 61, 98, 97, 0, 0, 0, 0]
  # Positions 2, 3, 4 predict "b", "a" and the end marker.
  assert example["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
  with pytest.raises(UserError, match="needs 5 tokens but --seq_len=4"):
    lm.PromptTargets([{"inputs": b"ab", "targets": b"ba"}], seq_len=4)[0]


def test_standardize_gives_zero_mean_unit_variance_per_image():
  from bigjax.data import images

  image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
  out = images.standardize(image)
  np.testing.assert_allclose([out.mean(), out.std()], [0.0, 1.0], atol=1e-5)
  assert np.all(np.isfinite(images.standardize(np.zeros((4, 4, 1), np.uint8))))


def test_augment_flips_and_crops_from_the_padded_image():
  from bigjax.data import images

  image = np.arange(16, dtype=np.float32).reshape(4, 4, 1) + 1
  flips = {images.Augment(flip=True)(image, np.random.default_rng(s)).tobytes() for s in range(20)}
  assert flips == {image.tobytes(), image[:, ::-1].tobytes()}
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  windows = {padded[t : t + 4, x : x + 4].tobytes() for t in range(5) for x in range(5)}
  for seed in range(20):
    crop = images.Augment(crop_padding=2)(image, np.random.default_rng(seed))
    assert crop.shape == image.shape and crop.tobytes() in windows


def test_misspelt_offline_dataset_suggests_the_right_name(tmp_path):
  with pytest.raises(
      UserError, match="'pyhton_stdlib_text' is not prepared .*did you mean 'python_stdlib_text'"
  ):
    sources.load_source("pyhton_stdlib_text", "train", str(tmp_path))
