"""Tokenizers for language models: raw bytes (the default), SentencePiece trained locally, and a
Hugging Face tokenizer.json.

Each turns bytes into int ids and back exactly, keep one id for the end of a document, and say how
many bytes of text each id stands for (`token_bytes`), so a language model's loss converts to bits
per byte whatever the tokenizer and runs with different tokenizers compare.

  --tokenizer=bytes      256 ids, one per byte; NUL (0) ends a document.
  --tokenizer=spm:VOCAB  a SentencePiece unigram model of VOCAB ids trained on the training split
                         (up to TRAIN_BYTES of it), saved as WORKDIR/tokenizer.model and loaded from
                         there on resume, evaluation and sampling. Normalisation is off and unseen
                         characters fall back to their UTF-8 bytes, so decode(encode(text)) == text
                         for any UTF-8 text (bytes that are not UTF-8 become U+FFFD).
  --tokenizer=hf:DIR     DIR/tokenizer.json read with the `tokenizers` library (a shared model's own
                         tokenizer, to fine-tune it); its end-of-sequence token (tokenizer_config.json's
                         eos_token) ends a document. A training run copies tokenizer.json into the
                         workdir, and later runs on that workdir must pass the same file. Byte-level
                         BPE (GPT-2, Llama 3, Qwen2) round-trips any UTF-8 text exactly.
"""

import filecmp
import functools
import json
import os
import shutil

import numpy as np

from bigjax import storage
from bigjax.errors import UserError

MODEL_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
# End-of-sequence tokens of the common families, for a directory without tokenizer_config.json.
_HF_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
SPM_EOS_ID = 1  # the end id of the SentencePiece models bigjax trains (after unk, 0)
TRAIN_BYTES = 200_000_000  # enough for a good vocabulary; more only slows training down
_META = "\u2581"
_SENTENCE_BYTES = 4096  # SentencePiece skips longer training "sentences"; documents are cut to this


class ByteTokenizer:
  """Each byte is its own id; NUL, which never occurs in text, ends a document."""

  name = "bytes"
  vocab_size = 256
  eod_id = 0

  def encode(self, text: bytes) -> np.ndarray:
    return np.frombuffer(text, np.uint8)

  def decode(self, ids) -> bytes:
    return bytes(np.asarray(ids, np.uint8))

  @property
  def token_bytes(self) -> np.ndarray:
    return np.ones(self.vocab_size, np.int32)


class SentencePieceTokenizer:
  """A trained SentencePiece model; its end-of-sentence id ends a document."""

  def __init__(self, model_path: str):
    import sentencepiece  # only SentencePiece runs need it

    self.path = model_path
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as e:  # SentencePiece's "could not parse ModelProto" and kin
      reason = " ".join(str(e).replace(f" from {model_path}", "").split())
      raise UserError(
          f"{model_path} is damaged ({reason}); restore it from a copy: the run's checkpoints were "
          "trained on its ids, so a new model means starting over, in a new --workdir (deleting it "
          "here retrains it, which is right only before the first checkpoint)"
      ) from None
    self.vocab_size = self._sp.vocab_size()
    self.eod_id = self._sp.eos_id()
    self.name = f"spm:{self.vocab_size}"
    self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]

  def encode(self, text: bytes) -> np.ndarray:
    # SentencePiece reads "▁" (U+2581) as its space symbol, so a literal one would come back as a
    # space: it is spelled with its three byte-fallback ids instead.
    parts = self._sp.encode(text.decode("utf-8", errors="replace").split(_META))
    ids = parts[0]
    for part in parts[1:]:
      ids += self._meta_ids + part
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> bytes:
    return self._sp.decode([int(i) for i in ids]).encode("utf-8")

  @property
  def token_bytes(self) -> np.ndarray:
    """Bytes of text per id: a byte-fallback piece is one byte, a text piece its UTF-8 length (its
    "▁" stands for a space), the end of document counts as one byte like the byte tokenizer's NUL,
    and other control ids as none."""
    sp = self._sp

    def size(i):
      if sp.is_byte(i) or i == self.eod_id:
        return 1
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        return 0
      return len(sp.id_to_piece(i).replace(_META, " ").encode("utf-8"))

    return np.array([size(i) for i in range(self.vocab_size)], np.int32)


@functools.cache
def _byte_of_char() -> dict[str, int]:
  """Byte-level BPE's alphabet (GPT-2's): each byte is one printable character, the printable
  Latin-1 bytes themselves and the rest shifted to 256 and up, so pieces are strings of bytes."""
  printable = [
      *range(ord("!"), ord("~") + 1),
      *range(ord("\xa1"), ord("\xac") + 1),
      *range(ord("\xae"), ord("\xff") + 1),
  ]
  chars, shifted = {}, 0
  for byte in range(256):
    if byte in printable:
      chars[chr(byte)] = byte
    else:
      chars[chr(256 + shifted)] = byte
      shifted += 1
  return chars


def _uses_byte_level(node) -> bool:
  """Whether a tokenizer.json decoder (possibly a Sequence of them) is byte-level."""
  if isinstance(node, dict):
    return node.get("type") == "ByteLevel" or any(
        _uses_byte_level(v) for v in node.get("decoders") or []
    )
  return False


class HuggingFaceTokenizer:
  """A Hugging Face tokenizer.json; its end-of-sequence token ends a document."""

  def __init__(self, directory: str):
    import tokenizers as hf_tokenizers  # only --tokenizer=hf: runs need it

    self.path = os.path.join(directory, HF_FILE)
    if not os.path.isfile(self.path):
      raise UserError(
          f"--tokenizer=hf:{directory}: no {HF_FILE} there; give a Hugging Face model or tokenizer "
          "directory"
      )
    try:
      self._tok = hf_tokenizers.Tokenizer.from_file(self.path)
      self._spec = json.loads(self._tok.to_str())
    except Exception as e:  # the Rust parser raises a bare Exception for a damaged file
      raise UserError(
          f"{self.path} is not a readable tokenizer ({' '.join(str(e).split())[:200]})"
      ) from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eod_id = self._end_of_document_id(directory)
    self.name = f"hf:{directory}"

  def _end_of_document_id(self, directory: str) -> int:
    config_path = os.path.join(directory, HF_CONFIG)
    candidates = _HF_END_TOKENS
    if os.path.isfile(config_path):
      try:
        with open(config_path, encoding="utf-8") as f:
          eos = json.load(f).get("eos_token")
      except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{config_path} is not a JSON object ({e})") from None
      if isinstance(eos, dict):
        eos = eos.get("content")
      if eos:
        candidates = (eos,)
    for token in candidates:
      if (token_id := self._tok.token_to_id(token)) is not None:
        return token_id
    raise UserError(
        f"{self.path}: no end-of-sequence token ({' or '.join(candidates)}) in its vocabulary; "
        f"a language model needs one to end each document (set eos_token in {HF_CONFIG})"
    )

  def encode(self, text: bytes) -> np.ndarray:
    ids = self._tok.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False).ids
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> bytes:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False).encode("utf-8")

  @property
  def token_bytes(self) -> np.ndarray:
    """Bytes of text per id: a byte-level piece its bytes, a byte-fallback piece (<0xAB>) one, a
    SentencePiece-style piece its UTF-8 length ("▁" a space), the end of document one byte like the
    byte tokenizer's NUL, and the unknown token and other special tokens none."""
    special = {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}
    unknown = self._spec.get("model", {}).get("unk_token")  # stands for text of unknown length
    if unknown is not None and self._tok.token_to_id(unknown) is not None:
      special.add(self._tok.token_to_id(unknown))
    byte_level = _uses_byte_level(self._spec.get("decoder"))
    byte_of_char = _byte_of_char()

    def size(i):
      if i == self.eod_id:
        return 1
      piece = self._tok.id_to_token(i)
      if i in special or piece is None:
        return 0
      if byte_level and all(c in byte_of_char for c in piece):
        return len(piece)  # one character per byte
      if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return 1
      return len(piece.replace(_META, " ").encode("utf-8"))

    return np.array([size(i) for i in range(self.vocab_size)], np.int32)


def parse(spec: str) -> int | None:
  """None for `bytes`; the vocabulary size for `spm:VOCAB` and for `hf:DIR` (read from the file)."""
  if spec == "bytes":
    return None
  kind, _, vocab = spec.partition(":")
  if kind == "hf" and vocab:
    return HuggingFaceTokenizer(vocab).vocab_size
  if kind != "spm" or not vocab.isdigit():
    raise UserError(
        f"--tokenizer={spec!r}: use bytes, spm:VOCAB (say spm:4096) or hf:DIR (a directory with "
        f"{HF_FILE})"
    )
  if int(vocab) < 300:
    raise UserError(
        f"--tokenizer={spec}: a SentencePiece vocabulary needs room for the 256 byte ids and "
        "some pieces; use at least spm:300"
    )
  return int(vocab)


def train_sentencepiece(documents, vocab_size: int, model_path: str) -> SentencePieceTokenizer:
  """Trains a byte-exact SentencePiece model on an iterable of byte strings and writes it to
  `model_path`."""
  import sentencepiece

  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_sentences(documents),
        model_prefix=model_path[: -len(".model")],
        vocab_size=vocab_size,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=_SENTENCE_BYTES,
        unk_id=0,
        bos_id=-1,
        eos_id=SPM_EOS_ID,
        pad_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:  # e.g. a vocabulary larger than the text can fill
    raise UserError(f"SentencePiece training failed: {' '.join(str(e).split())}") from None
  return SentencePieceTokenizer(model_path)


def _sentences(documents):
  """Documents as UTF-8 strings of at most _SENTENCE_BYTES bytes, cut after a newline where one
  comes, so pieces can span lines (indentation, blank lines) the way the text does."""
  budget = TRAIN_BYTES
  for document in documents:
    text = document.decode("utf-8", errors="replace")
    chunk = ""
    for line in text.splitlines(keepends=True):
      if chunk and len((chunk + line).encode()) > _SENTENCE_BYTES:
        yield chunk
        chunk = ""
      chunk += line[: _SENTENCE_BYTES // 4]  # a UTF-8 character is at most 4 bytes
    if chunk:
      yield chunk
    budget -= len(document)
    if budget <= 0:
      return


def open_tokenizer(spec: str, workdir: str | None, documents=None):
  """The tokenizer `spec` names. SentencePiece loads WORKDIR/tokenizer.model, or trains it on
  `documents` (a callable returning an iterable of byte strings) when it is not there yet. A
  workdir on a bucket keeps its tokenizer files there too, used through a local copy."""
  if workdir and storage.is_remote(workdir):
    return _open_through_local_copy(spec, workdir, documents)
  return _open_in(spec, workdir, documents, shown=workdir, copy=None)


class _BucketCopy:
  """A bucket workdir's tokenizer files in a local folder: SentencePiece and tokenizers read and
  write local files only."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.local = os.path.join(
        storage.local_cache_root(), "workdirs", workdir.replace("://", "/", 1)
    )

  def fetch(self) -> None:
    """The bucket's files down; a local file the bucket no longer has goes (a replaced workdir)."""
    os.makedirs(self.local, exist_ok=True)
    for name in (MODEL_FILE, HF_FILE):
      remote, here = os.path.join(self.workdir, name), os.path.join(self.local, name)
      if storage.exists(remote):
        storage.copy_to_local(remote, here)
      elif os.path.exists(here):
        os.remove(here)

  def publish(self) -> None:
    """What a run added locally up to the bucket (process 0)."""
    for name in (MODEL_FILE, HF_FILE):
      here, remote = os.path.join(self.local, name), os.path.join(self.workdir, name)
      if os.path.exists(here) and not storage.exists(remote):
        with open(here, "rb") as f:
          storage.write_whole(remote, f.read())


def _open_through_local_copy(spec: str, workdir: str, documents):
  """open_tokenizer on a bucket workdir: its files fetched first; a model a training run makes is
  published by process 0 before the other processes fetch it again."""
  import jax

  copy = _BucketCopy(workdir)
  copy.fetch()
  tokenizer = _open_in(spec, copy.local, documents, shown=workdir, copy=copy)
  if jax.process_index() == 0:
    copy.publish()  # a Hugging Face tokenizer.json a training run keeps
  return tokenizer


def _open_in(spec: str, workdir: str | None, documents, shown: str | None, copy):
  """open_tokenizer on a local `workdir`, naming `shown` in its messages; `copy` (a _BucketCopy)
  publishes a model trained there before the other processes read it."""
  if spec.startswith("hf:"):
    return _open_hf_tokenizer(
        spec[len("hf:") :], workdir, training=documents is not None, shown=shown
    )
  vocab = parse(spec)
  path = os.path.join(workdir, MODEL_FILE)
  if os.path.exists(os.path.join(workdir, HF_FILE)):
    raise UserError(
        f"{shown} was trained with the Hugging Face tokenizer {HF_FILE} kept there: pass the run's "
        "--tokenizer=hf:DIR"
    )
  if vocab is None:
    if os.path.exists(path):
      raise UserError(
          f"{shown} was trained with the SentencePiece model {MODEL_FILE}: pass the run's "
          "--tokenizer=spm:VOCAB"
      )
    return ByteTokenizer()
  if not os.path.exists(path):
    if documents is None:
      raise UserError(f"no SentencePiece model in {shown}; train with --tokenizer={spec} first")
    _train_on_process_zero(documents, vocab, path, copy)
  tokenizer = SentencePieceTokenizer(path)
  if tokenizer.vocab_size != vocab:
    raise UserError(
        f"{path} has {tokenizer.vocab_size} ids but --tokenizer={spec}; use that size or a new --workdir"
    )
  return tokenizer


def _open_hf_tokenizer(
    directory: str, workdir: str, training: bool, shown: str | None = None
) -> HuggingFaceTokenizer:
  """The tokenizer in `directory`, which must be the one a workdir was trained with: a training run
  keeps a copy of its tokenizer.json, and every later run compares against it."""
  tokenizer = HuggingFaceTokenizer(directory)
  if os.path.exists(os.path.join(workdir, MODEL_FILE)):
    raise UserError(
        f"{shown or workdir} was trained with the SentencePiece model {MODEL_FILE}: pass the run's "
        "--tokenizer=spm:VOCAB"
    )
  kept = os.path.join(workdir, HF_FILE)
  if os.path.exists(kept):
    if not filecmp.cmp(kept, tokenizer.path, shallow=False):
      raise UserError(
          f"{tokenizer.path} differs from the {HF_FILE} that {shown or workdir} was trained with: its ids "
          f"would mean other text; pass --tokenizer=hf:DIR of that tokenizer, or use a new --workdir"
      )
  elif training:
    import jax

    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      shutil.copyfile(tokenizer.path, f"{kept}.partial")
      os.replace(f"{kept}.partial", kept)
  return tokenizer


def _train_on_process_zero(documents, vocab: int, path: str, copy=None) -> None:
  """Process 0 trains and writes (and publishes it to the bucket of `copy`); every process then
  reads the same file (the workdir is shared, as the checkpoints need)."""
  import jax

  if jax.process_index() == 0:
    tmp = f"{path[:-len('.model')]}.partial.model"
    train_sentencepiece(documents(), vocab, tmp)
    os.replace(tmp, path)  # a run killed mid-training never leaves a model that looks finished
    os.remove(tmp[: -len(".model")] + ".vocab")
    if copy is not None:
      copy.publish()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("bigjax tokenizer trained")
    if copy is not None and jax.process_index() != 0:  # another host: its own local copy
      copy.fetch()
