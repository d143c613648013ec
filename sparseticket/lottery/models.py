"""Networks of the lottery-ticket papers (Frankle & Carbin 2019; Frankle et al. 2019), from
plain nn.Linear / nn.Conv2d / nn.BatchNorm2d / nn.ReLU layers so that
``sparseticket.nn.sparsify`` can swap the Linear and Conv2d layers. Pools are
``sparseticket.nn.MaxPool2d``: nn.MaxPool2d with the same results, whose 2x2 case runs a
branch-free CPU kernel (13-50x faster forward than aten's NCHW pool, bench/bench_pool.py),
in sparse and dense runs alike.

    model = get_model("conv4", input_shape=(1, 28, 28), num_classes=10)
    model.output_layer            # 'fc3': the final nn.Linear, often pruned at a lower rate

Every model maps x: [B, C, H, W] to logits [B, num_classes]. Layer names are stable
(``conv1``, ``fc1``, ``layer2.0.conv1``, ...), so masks and checkpoints can refer to them.
"""
from __future__ import annotations

import inspect
import operator
from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

from ..nn.pool import MaxPool2d

__all__ = ["MODELS", "VGG11", "BasicBlock", "ConvNet", "LeNet", "ResNet20", "available_models", "get_model",
           "register_model"]

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(input_shape, num_classes, **options) -> nn.Module`` becomes ``name``.

    The module must have ``output_layer``: the qualified name of its final nn.Linear.
    """

    def add(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return add


def available_models() -> list[str]:
    return sorted(MODELS)


def get_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` (see ``available_models()``) for inputs [B, *input_shape].

    Weights are drawn from torch's global generator: the same ``torch.manual_seed`` gives
    the same network.
    """
    builder = MODELS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(available_models())}")
    try:
        shape = tuple(operator.index(s) for s in input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name}: input_shape must be three positive integers (C, H, W), got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    signature = inspect.signature(builder)
    try:
        signature.bind(shape, num_classes, **kwargs)
    except TypeError as e:
        options = list(signature.parameters)[2:]
        raise TypeError(f"{name}: {e}; options: {', '.join(options) or 'none'}") from None
    model = builder(shape, num_classes, **kwargs)
    if not isinstance(dict(model.named_modules()).get(getattr(model, "output_layer", None)), nn.Linear):
        raise TypeError(f"{name}: the built model's output_layer must name an nn.Linear")
    return model


def _init_weights(model: nn.Module) -> nn.Module:
    # open_lth's 'kaiming_normal' initializer: He normal, fan-in, ReLU gain, on every conv and
    # linear weight (the output layer included); biases and BatchNorm keep torch's defaults.
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return model


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


class LeNet(nn.Sequential):
    """LeNet-300-100: x [B, C, H, W] -> flatten -> fc1 (300) -> fc2 (100) -> fc3 [B, classes]."""

    output_layer = "fc3"

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, int] = (300, 100)):
        if len(hidden) != 2:
            raise ValueError(f"LeNet: hidden must hold two widths, got {hidden!r}")
        c, h, w = input_shape
        super().__init__(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c * h * w, hidden[0])), ("relu_fc1", nn.ReLU()),
            ("fc2", nn.Linear(hidden[0], hidden[1])), ("relu_fc2", nn.ReLU()),
            ("fc3", nn.Linear(hidden[1], num_classes)),
        ]))
        _init_weights(self)


class ConvNet(nn.Sequential):
    """Conv-2/4/6: ``pairs`` pairs of 3x3 convs (64, 128, 256 channels), each pair followed
    by a 2x2 max-pool, then fc1 (256) -> fc2 (256) -> fc3 [B, classes].

    Names: conv1..conv{2·pairs} (relu1..), pool1..pool{pairs}, flatten, fc1..fc3.
    """

    output_layer = "fc3"

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, pairs: int):
        c, h, w = input_shape
        if (h >> pairs) < 1 or (w >> pairs) < 1:
            raise ValueError(f"conv{2 * pairs}: its {pairs} 2x2 max-pools need height and width >= {1 << pairs}, "
                             f"got input_shape {tuple(input_shape)}")
        layers = OrderedDict()
        for p in range(pairs):
            for i in (2 * p + 1, 2 * p + 2):
                layers[f"conv{i}"] = _conv3x3(c, 64 << p)
                layers[f"relu{i}"] = nn.ReLU()
                c = 64 << p
            layers[f"pool{p + 1}"] = MaxPool2d(2)
            h, w = h // 2, w // 2
        layers["flatten"] = nn.Flatten()
        layers["fc1"], layers["relu_fc1"] = nn.Linear(c * h * w, 256), nn.ReLU()
        layers["fc2"], layers["relu_fc2"] = nn.Linear(256, 256), nn.ReLU()
        layers["fc3"] = nn.Linear(256, num_classes)
        super().__init__(layers)
        _init_weights(self)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN with a residual: [B, cin, H, W] -> [B, cout, ceil(H/stride), ceil(W/stride)].

    When the shape changes the shortcut is a 1x1 conv + BN (He et al.'s option B; no
    zero-padded option A), so it is a plain conv that can be pruned like the others.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        # No conv biases: the BatchNorm right after subtracts any bias again.
        self.conv1, self.bn1, self.relu1 = _conv3x3(cin, cout, stride, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, self.bn2 = _conv3x3(cout, cout, bias=False), nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(cout)),
            ]))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): conv1 (width) -> layer1..3 of 3 BasicBlocks with
    width, 2·width, 4·width channels (stride 2 entering layer2 and layer3) -> global average
    pool -> fc [B, classes]. ``width`` 16 is the paper's network."""

    output_layer = "fc"

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16):
        super().__init__()
        c = input_shape[0]
        self.conv1, self.bn1, self.relu1 = _conv3x3(c, width, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        c = width
        for stage, stride in ((1, 1), (2, 2), (3, 2)):
            out = width << (stage - 1)
            blocks = [BasicBlock(c if b == 0 else out, out, stride if b == 0 else 1) for b in range(3)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            c = out
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(c, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class VGG11(nn.Sequential):
    """VGG-11 with BatchNorm: conv 64, pool, 128, pool, 256, 256, pool, 512, 512, pool, 512,
    512, pool (each conv 3x3 + BN + ReLU) -> flatten -> fc [B, classes].

    A pool that would shrink height or width below 1 is left out (so 28x28 keeps four pools
    and 8x8 three); the remaining pools keep their names pool1..pool5.
    """

    output_layer = "fc"
    plan = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        c, h, w = input_shape
        layers = OrderedDict()
        conv = pool = 0
        for step in self.plan:
            if step == "M":
                pool += 1
                if min(h, w) >= 2:
                    layers[f"pool{pool}"] = MaxPool2d(2)
                    h, w = h // 2, w // 2
                continue
            conv += 1
            layers[f"conv{conv}"] = _conv3x3(c, step, bias=False)  # BN follows: a bias would be cancelled
            layers[f"bn{conv}"] = nn.BatchNorm2d(step)
            layers[f"relu{conv}"] = nn.ReLU()
            c = step
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(c * h * w, num_classes)
        super().__init__(layers)
        _init_weights(self)


@register_model("lenet_300_100")
def _lenet_300_100(input_shape, num_classes, hidden: tuple[int, int] = (300, 100)) -> nn.Module:
    return LeNet(input_shape, num_classes, hidden)


@register_model("conv2")
def _conv2(input_shape, num_classes) -> nn.Module:
    return ConvNet(input_shape, num_classes, pairs=1)


@register_model("conv4")
def _conv4(input_shape, num_classes) -> nn.Module:
    return ConvNet(input_shape, num_classes, pairs=2)


@register_model("conv6")
def _conv6(input_shape, num_classes) -> nn.Module:
    return ConvNet(input_shape, num_classes, pairs=3)


@register_model("resnet20")
def _resnet20(input_shape, num_classes, width: int = 16) -> nn.Module:
    return ResNet20(input_shape, num_classes, width)


@register_model("vgg11")
def _vgg11(input_shape, num_classes) -> nn.Module:
    return VGG11(input_shape, num_classes)
