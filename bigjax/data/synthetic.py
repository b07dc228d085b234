"""`synthetic_sequences`: sequence tasks with known answers, for quick learning checks.

Each example is an `inputs` string and its `targets` string (ASCII bytes):
  copy:     "kqzfa"   -> "kqzfa"
  reverse:  "kqzfa"   -> "afzqk"
  sort:     "kqzfa"   -> "afkqz"
  add:      "123+4567" -> "4690"
Inputs are 1 to 16 letters (copy, reverse, sort) or two numbers of 1 to 8 digits (add); the
letter tasks also come with inputs of 1 to 20 letters as `copy_20`, `reverse_20` and `sort_20`.
The data set is generated from a fixed seed: 20,000 train and 1,000 test examples per task, the
same on every machine.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

MAX_LETTERS = 16
LONG_LETTERS = 20  # the `_20` configs'
MAX_DIGITS = 8
SPLIT_SIZES = {"train": 20_000, "test": 1_000}
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)


def make_example(
    task: str, rng: np.random.Generator, max_letters: int = MAX_LETTERS
) -> tuple[bytes, bytes]:
  """One (inputs, targets) pair of `task`; a letter task's inputs hold 1 to `max_letters`."""
  if task == "add":
    a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, MAX_DIGITS + 1)))) for _ in range(2))
    return f"{a}+{b}".encode(), str(a + b).encode()
  letters = _LETTERS[rng.integers(0, len(_LETTERS), size=int(rng.integers(1, max_letters + 1)))]
  if task == "copy":
    return letters.tobytes(), letters.tobytes()
  if task == "reverse":
    return letters.tobytes(), letters[::-1].tobytes()
  if task == "sort":
    return letters.tobytes(), np.sort(letters).tobytes()
  raise ValueError(f"unknown synthetic task {task!r}")


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  seed: int = 0
  task: str = ""
  max_letters: int = MAX_LETTERS


class SyntheticSequences(tfds.core.GeneratorBasedBuilder):
  """Copy, reverse, sort and add: choose one as `synthetic_sequences/TASK`."""

  VERSION = tfds.core.Version("1.0.0")
  # The `_20` configs came later under the same version: the first four's examples are unchanged.
  RELEASE_NOTES = {"1.0.0": "copy, reverse, sort, add; 20,000 train and 1,000 test examples each."}
  BUILDER_CONFIGS = [
      SyntheticConfig(name=task, description=f"the {task} task", seed=i, task=task)
      for i, task in enumerate(("copy", "reverse", "sort", "add"))
  ] + [
      SyntheticConfig(
          name=f"{task}_{LONG_LETTERS}",
          description=f"the {task} task on 1 to {LONG_LETTERS} letters",
          seed=4 + i,
          task=task,
          max_letters=LONG_LETTERS,
      )
      for i, task in enumerate(("copy", "reverse", "sort"))
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic sequence-to-sequence tasks with known answers.",
        features=tfds.features.FeaturesDict(
            {"inputs": tfds.features.Text(), "targets": tfds.features.Text()}
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, size) for split, size in SPLIT_SIZES.items()}

  def _generate_examples(self, split: str, size: int):
    rng = np.random.default_rng([self.builder_config.seed, list(SPLIT_SIZES).index(split)])
    for i in range(size):
      config = self.builder_config
      inputs, targets = make_example(config.task, rng, config.max_letters)
      yield i, {"inputs": inputs, "targets": targets}
