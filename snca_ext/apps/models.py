"""Embedding networks: a ``dim`` linear head and L2 normalisation on a backbone.

``forward(x)`` returns the normalised features. A model built with ``classes > 0`` also has a
``classifier`` on the embedding before normalisation: ``Linear(dim, classes)``, the softmax
baseline of ``--loss softmax``, or with ``cosine_temperature`` a ``CosineClassifier`` (the
normalised softmax of ``--loss cosine-softmax``: cosine logits / T); ``forward(x, logits=True)``
then returns ``(features, logits)``, so both the features and the classifier's logits come out of
one call of the module (a DDP wrapper sees the whole forward).

The ResNets are torchvision's with ``fc`` replaced by a ``Linear(features, dim)``, so their
``state_dict`` keys are torchvision's, which are also the original SNCA project's: its
checkpoints load once the ``module.`` prefix of DataParallel is stripped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import resnet

from .errors import UsageError

RESNETS = {
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (resnet.Bottleneck, [3, 4, 23, 3]),
    "resnet152": (resnet.Bottleneck, [3, 8, 36, 3]),
}
ARCHS = (*RESNETS, "cifar_resnet18", "digits_cnn", "fashion_cnn")
# The image channels of this package's networks (the archs suggested for a data set's images).
CHANNELS_OF_ARCH = {1: ("digits_cnn", "fashion_cnn"), 3: (*RESNETS, "cifar_resnet18")}
# --arch timm:<name>: any timm model as the backbone (the optional extra snca_ext[timm]).
TIMM_PREFIX = "timm:"


def _outputs(embedding: Tensor, classifier: nn.Module | None, logits: bool) -> Tensor | tuple[Tensor, Tensor]:
    features = F.normalize(embedding, dim=1)
    if not logits:
        return features
    if classifier is None:
        raise ValueError("logits=True needs a model with a classifier head (build_model(..., classes > 0))")
    return features, classifier(embedding)


class CosineClassifier(nn.Module):
    """The head of the normalised softmax (``--loss cosine-softmax``): logits cos(x, w_c) / T,
    the cosine between the embedding and each class's weight vector over a temperature, the
    classifier counterpart of SNCA's exp(cos / T) (and the baseline that a tuned softmax is:
    NormFace, Wang et al. 2017). Its weights are a ``weight`` of ``[classes, dim]``, initialised
    as ``nn.Linear``'s, so that checkpoints name them as the linear head does."""

    def __init__(self, dim: int, classes: int, temperature: float) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.weight = nn.Parameter(nn.Linear(dim, classes, bias=False).weight.detach().clone())

    def forward(self, embedding: Tensor) -> Tensor:
        return F.normalize(embedding, dim=1) @ F.normalize(self.weight, dim=1).T / self.temperature

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, classes={self.weight.shape[0]}, temperature={self.temperature}"


class EmbeddingResNet(resnet.ResNet):
    """torchvision ResNet whose ``fc`` outputs ``dim`` features, L2-normalised."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.classifier: nn.Module | None = None

    def forward(self, x: Tensor, logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        return _outputs(super().forward(x), self.classifier, logits)


def cifar_resnet18(dim: int = 128) -> EmbeddingResNet:
    """ResNet18 for 32 x 32 inputs: a 3 x 3 stride-1 stem and no max-pool, so layer4 still sees
    4 x 4 maps instead of 1 x 1."""
    model = EmbeddingResNet(resnet.BasicBlock, [2, 2, 2, 2], num_classes=dim)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _conv_block(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    ]


class _ConvEmbedding(nn.Module):
    """Conv ``layers`` ending in ``channels`` maps, global average pool, a ``dim`` linear head
    (``fc``), L2 normalisation."""

    def __init__(self, layers: list[nn.Module], channels: int, dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, dim)
        self.classifier: nn.Module | None = None

    def forward(self, x: Tensor, logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        return _outputs(self.fc(self.features(x)), self.classifier, logits)


class DigitsCNN(_ConvEmbedding):
    """A small CNN for scikit-learn's 8 x 8 digits: three 3 x 3 conv blocks, global average pool,
    a ``dim`` linear head, L2 normalisation."""

    def __init__(self, dim: int = 128, width: int = 64) -> None:
        layers = [
            *_conv_block(1, width),
            *_conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_block(2 * width, 4 * width),
        ]
        super().__init__(layers, 4 * width, dim)


class FashionCNN(_ConvEmbedding):
    """A small CNN for 28 x 28 grey images (Fashion-MNIST), sized for training on a few CPU cores:
    a 3 x 3 conv block at full resolution, then one per halving (14 x 14, 7 x 7), each doubling
    the channels, global average pool, a ``dim`` linear head, L2 normalisation. Pooling early
    keeps the work per image at about 7.5 M multiply-adds."""

    def __init__(self, dim: int = 128, width: int = 32) -> None:
        layers = [
            *_conv_block(1, width),
            nn.MaxPool2d(2),
            *_conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_block(2 * width, 4 * width),
        ]
        super().__init__(layers, 4 * width, dim)


def check_arch(arch: str) -> str:
    """``arch`` if it names a network ``build_model`` can build: one of ``ARCHS`` or
    ``timm:<name>`` with a model name timm knows (timm installed); else ValueError saying why."""
    if arch in ARCHS:
        return arch
    if not arch.startswith(TIMM_PREFIX):
        raise ValueError(f"must be one of {', '.join(ARCHS)} or timm:<model name>, got {arch!r}")
    try:
        import timm
    except ImportError as error:
        raise ValueError(f"{arch} needs timm: pip install 'snca_ext[timm]'") from error
    name = arch[len(TIMM_PREFIX) :]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise ValueError(f"timm has no model {name!r}" + (f" (similar: {', '.join(close)})" if close else ""))
    return arch


class TimmEmbedding(nn.Module):
    """A timm model without its classifier (``num_classes=0``: pooled features) as the backbone,
    then a ``dim`` linear head (``fc``) and L2 normalisation."""

    def __init__(self, name: str, dim: int, in_channels: int = 3, weights: str | None = None) -> None:
        import timm

        super().__init__()
        # A local weights file through timm's own loader (weights_only / safetensors; its stem is
        # adapted to in_channels, its classifier dropped); never a download.
        local = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights)}} if weights else {}
        if not weights:
            self.backbone = timm.create_model(name, num_classes=0, in_chans=in_channels)
        else:
            try:
                self.backbone = timm.create_model(name, num_classes=0, in_chans=in_channels, **local)
                names = _weight_names(weights)
            except Exception as error:
                # timm's loader fails deep inside (a KeyError for a file without the stem's weights,
                # a safetensors or pickle error for a file that is not one): the user's file to fix.
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise UsageError(
                    f"--pretrained {weights}: not weights of timm's {name} ({type(error).__name__}: "
                    f"{first[:300]})"
                ) from error
            # timm loads leniently (keys it does not know are a warning): a file of another
            # network's weights would leave the backbone at its random initialisation, silently.
            missing = sorted(set(self.backbone.state_dict()) - names)
            if missing:
                raise UsageError(
                    f"--pretrained {weights}: not weights of timm's {name}: it lacks {len(missing)} of "
                    f"the backbone's {len(self.backbone.state_dict())} tensors ({', '.join(missing[:3])}"
                    f"{', ...' if len(missing) > 3 else ''})"
                )
        self.fc = nn.Linear(self.backbone.num_features, dim)
        self.classifier: nn.Module | None = None

    def forward(self, x: Tensor, logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        return _outputs(self.fc(self.backbone(x)), self.classifier, logits)


def _weight_names(path: str) -> set[str]:
    """The tensor names of a weights file as timm's loader unwraps them (a ``state_dict`` or
    ``model`` entry, DataParallel's ``module.`` prefix)."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            keys = set(file.keys())
    else:
        content = torch.load(path, map_location="cpu", weights_only=True)
        for entry in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(content, dict) and isinstance(content.get(entry), dict):
                content = content[entry]
                break
        keys = set(content) if isinstance(content, dict) else set()
    return {key.removeprefix("module.") for key in keys}


def input_channels(weights: dict[str, Tensor]) -> int:
    """The image channels a saved network takes: the input side of its first convolution (a
    stem or patch embedding: the first 4-D weight of its state dict)."""
    return next(int(w.shape[1]) for w in weights.values() if w.dim() == 4)


def build_model(
    arch: str,
    dim: int = 128,
    classes: int = 0,
    *,
    in_channels: int | None = None,
    weights: str | None = None,
    cosine_temperature: float | None = None,
) -> nn.Module:
    """The embedding network ``arch`` (one of ``ARCHS``, or ``timm:<name>``) with a ``dim``
    normalised output and, when ``classes > 0``, a classifier head on the embedding: linear (the
    softmax baseline), or with ``cosine_temperature`` a ``CosineClassifier`` (the normalised
    softmax). ``in_channels`` (None: 3 for timm models, the network's own otherwise) is
    checked against this package's networks, which take a fixed number, and sets a timm model's
    stem; ``weights`` (a local file of the backbone's weights) are for timm models."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
        raise ValueError(f"classes must be an int >= 0, got {classes!r}")
    if arch in RESNETS:
        block, layers = RESNETS[arch]
        model = EmbeddingResNet(block, layers, num_classes=dim)
    elif arch == "cifar_resnet18":
        model = cifar_resnet18(dim)
    elif arch == "digits_cnn":
        model = DigitsCNN(dim)
    elif arch == "fashion_cnn":
        model = FashionCNN(dim)
    elif arch.startswith(TIMM_PREFIX):
        model = TimmEmbedding(check_arch(arch)[len(TIMM_PREFIX) :], dim, in_channels or 3, weights)
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if weights is not None and not arch.startswith(TIMM_PREFIX):
        raise ValueError(f"weights (--pretrained) are for timm:<name> networks, got arch {arch!r}")
    if in_channels is not None and not arch.startswith(TIMM_PREFIX):
        # This package's networks take a fixed number of channels (the timm ones adapt their stem).
        takes = input_channels(model.state_dict())
        if takes != in_channels:
            raise UsageError(
                f"--arch {arch} takes {takes}-channel images, but the data set's have {in_channels} "
                f"channel(s): choose an --arch for them ({', '.join(CHANNELS_OF_ARCH.get(in_channels, ()))}, "
                "or timm:<name>)"
            )
    if cosine_temperature is not None and not classes:
        raise ValueError("cosine_temperature is the temperature of a classifier head: it needs classes > 0")
    if classes:
        model.classifier = (
            nn.Linear(dim, classes)
            if cosine_temperature is None
            else CosineClassifier(dim, classes, cosine_temperature)
        )
    return model
