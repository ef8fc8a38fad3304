"""Byte-level text data for the language-model example: a corpus that needs no download.

The default corpus is the source text of the running interpreter's Python standard library: every
``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` / ``dist-packages``
excluded), in sorted order of their paths relative to that folder. Human-written text that ships
with every Python install; about 32 MB (1,740 files) for CPython 3.12. It changes with the Python
version, so every run prints the corpus' size and fingerprint.

Tokens are bytes (0..255) plus one special token, ``EOS = 256``, written after every document;
the model's vocabulary is padded to :data:`VOCAB_PADDED` (a multiple of 128, so the output
projection tiles the quantized formats' blocks). The padded logits are never targets.

Split (fixed, documented): a file belongs to validation when the first 8 hex digits of the
SHA-256 of its relative path (POSIX form, UTF-8), read as an integer, are divisible by 20 (about
5% of the files); every other file is training data. The split depends only on the path, so it
is the same on every machine that has the same files.

Batches: training batch ``s`` is ``batch_size`` windows of ``seq_len + 1`` tokens at offsets
drawn by ``numpy.random.default_rng([seed, s])`` from the concatenated training stream, so the
data order depends only on (seed, step): identical for every recipe, and a resumed run sees the
same batches as an uninterrupted one. Validation uses fixed, evenly spaced windows of the
validation stream.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sysconfig

import numpy as np

EOS = 256
VOCAB = 257
VOCAB_PADDED = 384
VALIDATION_MODULUS = 20
_SKIPPED_FOLDERS = ("site-packages", "dist-packages", "__pycache__")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of a split corpus.

    Attributes:
      name: where the text came from.
      train: uint16 tokens of the training files, each followed by ``EOS``.
      validation: uint16 tokens of the validation files, each followed by ``EOS``.
      train_files: number of training files.
      validation_files: number of validation files.
      fingerprint: the first 12 hex digits of SHA-256 over both streams (identifies the corpus).
    """

    name: str
    train: np.ndarray
    validation: np.ndarray
    train_files: int
    validation_files: int
    fingerprint: str

    def describe(self) -> str:
        return (f"corpus {self.name}: {self.train_files} train files ({self.train.size:,} tokens), "
                f"{self.validation_files} validation files ({self.validation.size:,} tokens), "
                f"fingerprint {self.fingerprint}")


def stdlib_path() -> pathlib.Path:
    """The standard library folder of the running interpreter."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str) -> bool:
    """Whether a file (its path relative to the corpus root, POSIX form) is validation data.

    Example:
      >>> is_validation("json/decoder.py") in (True, False)
      True
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % VALIDATION_MODULUS == 0


def list_files(root: pathlib.Path, suffixes: tuple[str, ...] | None) -> list[pathlib.Path]:
    """Files under ``root`` (or ``root`` itself), sorted by relative path; ``suffixes=None`` keeps
    every file."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such file or directory.")
    files = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if any(part in _SKIPPED_FOLDERS or part.startswith(".") for part in parts):
            continue
        if path.is_file() and (suffixes is None or path.suffix in suffixes):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _tokens(chunks: list[bytes]) -> np.ndarray:
    if not chunks:
        return np.zeros((0,), np.uint16)
    sizes = [len(c) + 1 for c in chunks]
    out = np.full((sum(sizes),), EOS, np.uint16)
    start = 0
    for chunk, size in zip(chunks, sizes):
        out[start:start + size - 1] = np.frombuffer(chunk, np.uint8)
        start += size
    return out


@functools.lru_cache(maxsize=2)  # a multi-run process (tests, notebooks) reads the files once
def load_corpus(path: str | None = None) -> Corpus:
    """Reads and splits a corpus.

    Args:
      path: ``None`` for the Python standard library's ``.py`` files; a text file (split into
        90% / 10% by bytes, at a byte boundary, first part training); or a folder (every file
        under it, split by path hash as the standard library is).

    Returns:
      The :class:`Corpus`.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the corpus has no training or no validation text.

    Example:
      >>> corpus = load_corpus()
      >>> int(corpus.train.max()) <= EOS
      True
    """
    root = stdlib_path() if path is None else pathlib.Path(path).expanduser()
    name = f"Python {sysconfig.get_python_version()} stdlib ({root})" if path is None else str(root)
    files = list_files(root, (".py",) if path is None else None)
    if root.is_file():
        data = root.read_bytes()
        cut = int(len(data) * 0.9)
        train, validation = _tokens([data[:cut]]), _tokens([data[cut:]])
        train_files = validation_files = 1
    else:
        relative = [p.relative_to(root).as_posix() for p in files]
        held_out = [is_validation(r) for r in relative]
        train = _tokens([p.read_bytes() for p, v in zip(files, held_out) if not v])
        validation = _tokens([p.read_bytes() for p, v in zip(files, held_out) if v])
        validation_files = sum(held_out)
        train_files = len(files) - validation_files
    if train.size < 2 or validation.size < 2:
        raise ValueError(f"corpus {name}: needs text in both splits (train {train.size} tokens, "
                         f"validation {validation.size} tokens); give a larger --data.")
    digest = hashlib.sha256(train.tobytes())
    digest.update(validation.tobytes())
    return Corpus(name, train, validation, train_files, validation_files, digest.hexdigest()[:12])


def _windows(stream: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return stream[starts[:, None] + np.arange(length)[None, :]].astype(np.int32)


def _fit(stream: np.ndarray, length: int, what: str) -> None:
    if stream.size < length:
        raise ValueError(f"the {what} stream has {stream.size} tokens, fewer than one window of "
                         f"seq_len + 1 = {length}; lower --seq-len or give more --data.")


def train_batch(corpus: Corpus, step: int, *, batch_size: int, seq_len: int,
                seed: int) -> np.ndarray:
    """Training batch number ``step``: ``[batch_size, seq_len + 1]`` int32 tokens.

    Depends only on (corpus, step, batch_size, seq_len, seed).

    Example:
      >>> train_batch(load_corpus(), 0, batch_size=2, seq_len=8, seed=0).shape
      (2, 9)
    """
    length = seq_len + 1
    _fit(corpus.train, length, "training")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, corpus.train.size - length + 1, size=batch_size)
    return _windows(corpus.train, starts, length)


def validation_batches(corpus: Corpus, *, num_batches: int, batch_size: int,
                       seq_len: int) -> np.ndarray:
    """Fixed validation windows, evenly spaced over the validation stream:
    ``[num_batches, batch_size, seq_len + 1]`` int32."""
    length = seq_len + 1
    _fit(corpus.validation, length, "validation")
    count = num_batches * batch_size
    starts = np.linspace(0, corpus.validation.size - length, count).astype(np.int64)
    return _windows(corpus.validation, starts, length).reshape(num_batches, batch_size, length)
