"""sparseticket.lottery.data and .models: the data sets and networks of the IMP runner.

Models: every registered network builds for MNIST-, CIFAR- and digits-shaped inputs,
names its output layer, has the published parameter count, and still runs after
``sparseticket.nn.sparsify`` converted all of its Linear/Conv2d layers.
Data: split sizes, stratification, determinism and disjointness; statistics from the
train split only; the IDX and CIFAR readers on tiny files written here; Batches resuming
with the permutations an uninterrupted run would draw.
"""
import collections
import copy
import functools
import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

import sparseticket.nn as stnn
from sparseticket.lottery import data as D
from sparseticket.lottery import models as M
from sparseticket.lottery.data import Batches, Split, load_dataset
from sparseticket.lottery.models import available_models, get_model

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
ALL_MODELS = ["lenet_300_100", "conv2", "conv4", "conv6", "resnet20", "vgg11"]


@functools.cache
def built(name, shape):
    """One instance per (model, input shape) for the tests that only look (VGG alone has
    9.2M weights to initialise); tests that change a model take a deepcopy."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return get_model(name, shape, 10)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def dense_layers(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


# ----------------------------------------------------------------------------- models


def test_registry_lists_every_model():
    assert available_models() == sorted(ALL_MODELS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_builds_and_runs(name, shape):
    model = copy.deepcopy(built(name, shape))
    y = model(torch.randn(2, *shape))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    out = dict(model.named_modules())[model.output_layer]
    assert type(out) is nn.Linear and out.out_features == 10
    assert type(model).output_layer == model.output_layer


def test_parameter_counts():
    # LeNet-300-100 on 784 inputs: (784+1)*300 + (300+1)*100 + (100+1)*10 = 235500 + 30100 + 1010.
    assert n_params(built("lenet_300_100", (1, 28, 28))) == 266_610
    # Conv-4 on 1x28x28, weights + biases:
    #   conv1 1->64 3x3:    64*1*9 + 64    =      640
    #   conv2 64->64:       64*64*9 + 64   =   36_928
    #   conv3 64->128:      128*64*9 + 128 =   73_856
    #   conv4 128->128:     128*128*9 + 128 = 147_584
    #   two pools: 28 -> 14 -> 7, so fc1 sees 128*7*7 = 6272 inputs
    #   fc1 6272->256:      6272*256 + 256 = 1_605_888
    #   fc2 256->256:       256*256 + 256  =   65_792
    #   fc3 256->10:        256*10 + 10    =    2_570
    #   total                               = 1_933_258
    assert n_params(built("conv4", (1, 28, 28))) == 1_933_258
    # Published sizes on CIFAR-10 (Frankle & Carbin 2019 Table 1: Conv-2 4.3M, Conv-4 2.4M;
    # ResNet-20 ~0.27M, here with 1x1-conv shortcuts).
    assert round(n_params(built("conv2", (3, 32, 32))) / 1e5) == 43
    assert round(n_params(built("conv4", (3, 32, 32))) / 1e5) == 24
    assert round(n_params(built("resnet20", (3, 32, 32))) / 1e4) == 27


def test_layer_names():
    assert dense_layers(built("lenet_300_100", (1, 28, 28))) == ["fc1", "fc2", "fc3"]
    conv6 = built("conv6", (3, 32, 32))
    assert dense_layers(conv6) == [f"conv{i}" for i in range(1, 7)] + ["fc1", "fc2", "fc3"]
    resnet = dict(built("resnet20", (3, 32, 32)).named_modules())
    assert isinstance(resnet["layer2.0.shortcut.conv"], nn.Conv2d) and "layer1.0.shortcut.conv" not in resnet
    assert sum(type(m) is nn.Conv2d for m in resnet.values()) == 19 + 2  # 19 3x3 convs + 2 shortcuts
    # Pools that would shrink the image below 1x1 are left out: 28 -> 14 -> 7 -> 3 -> 1, 8 -> 4 -> 2 -> 1.
    pools = lambda shape: [n for n, m in built("vgg11", shape).named_modules() if isinstance(m, nn.MaxPool2d)]
    assert pools((3, 32, 32)) == ["pool1", "pool2", "pool3", "pool4", "pool5"]
    assert pools((1, 28, 28)) == ["pool1", "pool2", "pool3", "pool4"]
    assert pools((1, 8, 8)) == ["pool1", "pool2", "pool3"]


def test_initialisation_deterministic_and_kaiming():
    torch.manual_seed(7)
    a = get_model("conv2", (1, 8, 8), 10)
    torch.manual_seed(7)
    b = get_model("conv2", (1, 8, 8), 10)
    torch.manual_seed(8)
    c = get_model("conv2", (1, 8, 8), 10)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    # He normal, fan-in: std = sqrt(2 / fan_in); fc1 of LeNet has 235200 draws, so 2% is ~10 sigma.
    w = built("lenet_300_100", (1, 28, 28)).fc1.weight
    assert abs(w.std().item() / (2 / 784) ** 0.5 - 1) < 0.02
    bn = built("resnet20", (3, 32, 32)).bn1
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.bias, torch.zeros(16))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_sparsify_converts_every_layer(name):
    model = copy.deepcopy(built(name, (1, 8, 8))).eval()
    layers = dense_layers(model)
    total = sum(dict(model.named_modules())[n].weight.numel() for n in layers)
    # mode='sparse': 'auto' would first time both execution paths for every layer shape
    # (seconds for VGG), and the sparse kernels are the path this conversion has to feed.
    stnn.sparsify(model, amount=0.9, mode="sparse")
    assert dense_layers(model) == []
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, (stnn.SparseLinear, stnn.SparseConv2d))}
    assert sorted(sparse) == sorted(layers)
    assert sum(m.nnz for m in sparse.values()) == round(0.1 * total)
    with torch.no_grad():
        y = model(torch.randn(2, 1, 8, 8))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_too_small_inputs():
    with pytest.raises(ValueError, match=r"conv6.*>= 8"):
        get_model("conv6", (1, 4, 4), 10)
    with pytest.raises(ValueError, match=r"conv2.*>= 2"):
        get_model("conv2", (1, 1, 9), 10)
    for name in ("vgg11", "resnet20", "lenet_300_100"):  # no limit: pools are skipped / none
        assert get_model(name, (1, 1, 1), 3)(torch.randn(2, 1, 1, 1)).shape == (2, 3)


def test_get_model_errors_and_options():
    with pytest.raises(ValueError, match=r"unknown model 'lenet'.*conv2.*lenet_300_100.*vgg11"):
        get_model("lenet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="input_shape"):
        get_model("conv2", (28, 28), 10)
    with pytest.raises(ValueError, match="input_shape"):
        get_model("conv2", (1, 0, 28), 10)
    with pytest.raises(ValueError, match="input_shape"):
        get_model("conv2", (1, 28.0, 28), 10)
    assert get_model("lenet_300_100", torch.Size([1, 2, 2]), 10).fc1.in_features == 4
    with pytest.raises(ValueError, match="num_classes"):
        get_model("conv2", (1, 28, 28), 0)
    with pytest.raises(TypeError, match=r"resnet20: .*depth.*options: width"):
        get_model("resnet20", (3, 32, 32), 10, depth=56)
    assert get_model("lenet_300_100", (1, 8, 8), 10, hidden=(20, 10)).fc2.out_features == 10
    assert get_model("resnet20", (3, 8, 8), 10, width=8).fc.in_features == 32


def test_register_model():
    @M.register_model("tiny_for_test")
    def tiny(input_shape, num_classes):
        model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))
        model.output_layer = "1"
        return model

    try:
        assert "tiny_for_test" in available_models()
        assert get_model("tiny_for_test", (1, 2, 2), 3)(torch.randn(4, 1, 2, 2)).shape == (4, 3)
        with pytest.raises(ValueError, match="already registered"):
            M.register_model("tiny_for_test")(tiny)
    finally:
        del M.MODELS["tiny_for_test"]


# ----------------------------------------------------------------------------- bundled data sets


def raw_pixels(ds, split, scale):
    """Undo the normalisation: the integer pixel values [N, C, H, W] the split was made from."""
    mean = torch.tensor(ds.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float64).view(1, -1, 1, 1)
    return torch.round((split.x.double() * std + mean) * scale).to(torch.int64)


def samples(ds, split, scale):
    """Multiset of (pixels, label) of a split."""
    raw = raw_pixels(ds, split, scale).flatten(1).numpy()
    return collections.Counter((r.tobytes(), int(c)) for r, c in zip(raw, split.y))


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_mnist5k_is_default_and_stratified(mnist5k):
    assert D.DEFAULT_DATASET == "mnist5k" and set(D.available_datasets()) >= {"mnist5k", "digits", "mnist",
                                                                              "fashion_mnist", "cifar10"}
    ds = mnist5k
    assert (ds.name, ds.input_shape, ds.num_classes) == ("mnist5k", (1, 28, 28), 10)
    for split, n in ((ds.train, 3500), (ds.val, 500), (ds.test, 1000)):
        assert split.x.shape == (n, 1, 28, 28) and split.x.dtype == torch.float32
        assert split.y.shape == (n,) and split.y.dtype == torch.int64
        assert torch.bincount(split.y, minlength=10).tolist() == [n // 10] * 10
    # The source is sorted by class; the splits must not be.
    assert len(set(ds.val.y[:50].tolist())) > 5


def test_digits_sizes_and_stratification(digits):
    ds = digits
    assert ds.input_shape == (1, 8, 8) and (len(ds.train), len(ds.val), len(ds.test)) == (1257, 180, 360)
    whole = torch.bincount(torch.cat([ds.train.y, ds.val.y, ds.test.y]), minlength=10).double()
    for split in (ds.val, ds.test):
        share = whole * len(split) / whole.sum()
        assert ((torch.bincount(split.y, minlength=10) - share).abs() < 1).all()  # rounded up or down only


@pytest.mark.parametrize("name,scale,total", [("mnist5k", 255, 5000), ("digits", 16, 1797)])
def test_splits_deterministic_and_disjoint(name, scale, total, mnist5k, digits):
    ds = mnist5k if name == "mnist5k" else digits
    again, other = load_dataset(name, seed=0), load_dataset(name, seed=1)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(ds, part).x, getattr(again, part).x)
        assert torch.equal(getattr(ds, part).y, getattr(again, part).y)
    assert not torch.equal(ds.test.y, other.test.y) or not torch.equal(ds.test.x, other.test.x)
    # The three splits together are exactly the source data: each sample in one split only.
    together = samples(ds, ds.train, scale) + samples(ds, ds.val, scale) + samples(ds, ds.test, scale)
    assert sum(together.values()) == total and len(together) == total
    assert not set(samples(ds, ds.train, scale)) & set(samples(ds, ds.test, scale))


def test_normalisation_from_train_only(digits):
    ds = digits
    raw = {k: raw_pixels(ds, getattr(ds, k), 16).double() / 16 for k in ("train", "val", "test")}
    assert ds.mean[0] == pytest.approx(raw["train"].mean().item(), abs=1e-12)
    assert ds.std[0] == pytest.approx(raw["train"].std(unbiased=False).item(), abs=1e-12)
    everything = torch.cat(list(raw.values()))
    assert abs(everything.mean().item() - ds.mean[0]) > 1e-4  # so the check above can tell them apart
    assert abs(ds.train.x.double().mean().item()) < 1e-6 and abs(ds.train.x.double().std().item() - 1) < 1e-3
    expected_val = (raw["val"] - ds.mean[0]) / ds.std[0]
    assert torch.allclose(ds.val.x.double(), expected_val, atol=1e-5)
    # Another split of the same data has its own train statistics.
    assert load_dataset("digits", seed=0, val_size=0, test_size=900).mean != ds.mean


def test_sizes_and_argument_errors(digits):
    ds = load_dataset("digits", seed=3, val_size=0, test_size=100)
    assert ds.val.x.shape == (0, 1, 8, 8) and len(ds.test) == 100 and len(ds.train) == 1697
    with pytest.raises(ValueError, match="no training samples"):
        load_dataset("digits", val_size=1000, test_size=797)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=-1)
    with pytest.raises(ValueError, match="seed"):
        load_dataset("digits", seed=-2)
    with pytest.raises(ValueError, match=r"unknown data set 'svhn'.*cifar10.*digits.*mnist5k"):
        load_dataset("svhn")
    with pytest.raises(TypeError, match="float32"):
        Split(torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="samples"):
        Split(torch.zeros(2, 1, 2, 2), torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- files on disk


def write_idx(path, array, gz):
    """An IDX file: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    body = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body += array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open(str(path) + ".gz", "wb") if gz else open(path, "wb")) as f:
        f.write(body)


def tiny_idx_set(folder, rng, gz, shape=(5, 4), n_train=60, n_test=20):
    """Four IDX files in ``folder``; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.permutation(np.arange(n_test, dtype=np.uint8) % 10),
    }
    for i, (name, a) in enumerate(arrays.items()):
        write_idx(folder / name, a, gz if isinstance(gz, bool) else i % 2 == 0)
    return arrays


@pytest.mark.parametrize("gz", [True, False, "mixed"])
def test_idx_loader(tmp_path, gz):
    arrays = tiny_idx_set(tmp_path, np.random.default_rng(0), gz)
    ds = load_dataset("mnist", str(tmp_path), val_size=10, seed=1)
    assert ds.input_shape == (1, 5, 4) and (len(ds.train), len(ds.val), len(ds.test)) == (50, 10, 20)
    assert torch.bincount(ds.val.y, minlength=10).tolist() == [1] * 10
    # The official test set, in its own order.
    assert ds.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert torch.equal(raw_pixels(ds, ds.test, 255)[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).long())
    train_raw = np.concatenate([raw_pixels(ds, s, 255).numpy() for s in (ds.train, ds.val)])
    assert ds.mean[0] == pytest.approx(raw_pixels(ds, ds.train, 255).double().mean().item() / 255, abs=1e-12)
    assert ds.mean[0] != pytest.approx(arrays["train-images-idx3-ubyte"].mean() / 255, abs=1e-9)  # val left out
    assert sorted(map(bytes, train_raw.reshape(60, -1).astype(np.uint8))) == \
        sorted(map(bytes, arrays["train-images-idx3-ubyte"].reshape(60, -1)))
    subset = load_dataset("mnist", str(tmp_path), val_size=10, test_size=10)
    assert torch.bincount(subset.test.y, minlength=10).tolist() == [1] * 10


def test_idx_torchvision_layout_and_default_val(tmp_path):
    tiny_idx_set(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(1), True, n_train=6000)
    ds = load_dataset("fashion_mnist", tmp_path)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1000, 5000, 20)


def test_read_idx_checks(tmp_path):
    ints = np.array([[1, -2, 70000], [3, 4, 5]], dtype=np.int32)
    write_idx(tmp_path / "ints", ints, gz=False)
    out = D.read_idx(str(tmp_path / "ints"))
    assert out.dtype == np.int32 and np.array_equal(out, ints)
    (tmp_path / "bad").write_bytes(b"\x08\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(str(tmp_path / "bad"))
    full = (tmp_path / "ints").read_bytes()
    (tmp_path / "short").write_bytes(full[:-3])
    with pytest.raises(ValueError, match=r"dims \[2, 3\] need 36 bytes, the file has 33"):
        D.read_idx(str(tmp_path / "short"))


def test_missing_files_and_no_root(tmp_path):
    tiny_idx_set(tmp_path, np.random.default_rng(2), False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*optionally \.gz.*" + str(tmp_path)) as e:
        load_dataset("mnist", str(tmp_path))
    assert str(e.value).endswith("missing in " + repr(str(tmp_path)) + ": t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*test_batch.*cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))
    for name in ("mnist", "fashion_mnist", "cifar10"):
        with pytest.raises(ValueError, match=r"local folder is required \(root=\.\.\.\).*nothing is downloaded"):
            load_dataset(name)


def write_cifar(folder, rng, n=10):
    """CIFAR-10 python batches laid out as the originals: bytes keys, each row the R plane, then G, then B."""
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(n) % 10)]
        raw = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data}, protocol=2)
        # The originals come from numpy 1, which named its module numpy.core (numpy 2: numpy._core).
        (folder / name).write_bytes(raw.replace(b"numpy._core.", b"numpy.core."))
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("parent", [False, True])
def test_cifar_loader(tmp_path, parent):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder, np.random.default_rng(3))
    ds = load_dataset("cifar10", str(tmp_path if parent else folder), val_size=10)
    assert ds.input_shape == (3, 32, 32) and len(ds.mean) == len(ds.std) == 3
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 10)
    data, labels = written["test_batch"]
    assert ds.test.y.tolist() == labels
    assert torch.equal(raw_pixels(ds, ds.test, 255), torch.from_numpy(data.reshape(10, 3, 32, 32)).long())
    assert abs(ds.train.x[:, 2].double().mean().item()) < 1e-6  # each channel centred separately


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path / "c", np.random.default_rng(4))
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": []}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load posix\.getcwd|refusing to load os\.getcwd"):
        load_dataset("cifar10", str(tmp_path / "c"), val_size=10)


# ----------------------------------------------------------------------------- batches


def tiny_split(n=23):
    return Split(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))


def epoch(batches):
    return [y.clone() for _, y in batches]


def test_batches_cover_each_epoch():
    split = tiny_split()
    b = Batches(split, 5, seed=0)
    assert len(b) == 5 and len(Batches(split, 5, drop_last=True)) == 4
    first, second = epoch(b), epoch(b)
    assert [len(y) for y in first] == [5, 5, 5, 5, 3] and b.epoch == 2
    assert sorted(torch.cat(first).tolist()) == list(range(23)) and not torch.equal(torch.cat(first), torch.cat(second))
    for x, y in Batches(split, 5, seed=0):
        assert torch.equal(x.view(-1).long(), y)  # x and y stay paired
    assert [len(y) for y in epoch(Batches(split, 5, drop_last=True))] == [5] * 4
    assert torch.equal(torch.cat(epoch(Batches(split, 5, shuffle=False))), split.y)
    same = Batches(split, 5, seed=0)
    assert all(torch.equal(a, c) for a, c in zip(first, epoch(same)))
    x, _ = next(iter(Batches(split, 5, shuffle=False)))
    x.add_(100)
    assert split.x.max() == 22  # batches are copies
    with pytest.raises(ValueError, match="batch_size"):
        Batches(split, 0)


def test_batches_resume_between_epochs():
    split = tiny_split()
    run = Batches(split, 4, seed=11)
    for _ in range(3):
        epoch(run)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    resumed = Batches(split, 4, seed=999)  # the state, not the seed, decides
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.epoch == 3
    for _ in range(2):
        assert all(torch.equal(a, c) for a, c in zip(epoch(run), epoch(resumed)))
    assert resumed.epoch == run.epoch == 5


def test_batches_resume_mid_epoch():
    split = tiny_split()
    run = Batches(split, 4, seed=5)
    epoch(run)
    it = iter(run)
    state_at_start = run.state_dict()  # permutation drawn, nothing handed out yet
    seen = [next(it)[1] for _ in range(2)]
    state = run.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    rest = [y for _, y in it]
    following = epoch(run)

    resumed = Batches(split, 4, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, c) for a, c in zip(epoch(resumed), rest)) and resumed.epoch == 2
    assert all(torch.equal(a, c) for a, c in zip(epoch(resumed), following))

    from_start = Batches(split, 4)
    from_start.load_state_dict(state_at_start)
    assert all(torch.equal(a, c) for a, c in zip(epoch(from_start), seen + rest))


def test_batches_state_must_match():
    state = Batches(tiny_split(), 4).state_dict()
    with pytest.raises(ValueError, match=r"batch_size: saved 4, here 5"):
        Batches(tiny_split(), 5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_samples: saved 23, here 24"):
        Batches(tiny_split(24), 4).load_state_dict(state)
