"""The command line of ``python -m snca_ext.train``: ``build_parser`` and its argument types."""

from __future__ import annotations

import argparse

from snca_ext import distributed
from snca_ext.memory import BANK_DTYPES

from ..arguments import (
    FRACTION,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    arch_type,
    class_list_type,
    int_list_type,
    number,
    program_name,
)
from ..data import DATASETS
from ..data.omniglot import SPLITS as OMNIGLOT_SPLITS
from ..data.omniglot import parse_names
from ..models import ARCHS
from .config import RECIPES

# Cosines lie in [-1, 1]: above T = 10 the weights exp(cos / T) of the loss differ by less than
# exp(2 / 10) = 1.22 across the whole bank, and the gradient (of order 1 / T^2) vanishes: at
# T = 1e30 it is exactly zero in float32 and a run would train nothing, silently.
MAX_TEMPERATURE = 10.0
TEMPERATURE = number(
    float,
    0.0,
    MAX_TEMPERATURE,
    min_open=True,
    what=f"a number in (0, {MAX_TEMPERATURE:g}] (above it the loss's weights exp(cos / T) are nearly "
    "equal and it has no gradient to train on)",
)


def _omniglot_splits(text: str) -> str:
    """argparse type of --omniglot-train: known split names, canonical (``SPLITS`` order)."""
    names = parse_names(text)
    unknown = [name for name in names if name not in OMNIGLOT_SPLITS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated Omniglot splits among {', '.join(OMNIGLOT_SPLITS)}, got {text!r}"
        )
    return ",".join(name for name in OMNIGLOT_SPLITS if name in names)


def _alphabets(text: str) -> str:
    """argparse type of --holdout-alphabets: names, canonical (sorted, unique)."""
    names = sorted(parse_names(text))
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated alphabet names, got {text!r}")
    return ",".join(names)


def _schedule(text: str) -> str:
    from snca_ext import MomentumSchedule

    try:
        MomentumSchedule.parse(0.5, text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m snca_ext.train``, one argument group per concern."""
    parser = argparse.ArgumentParser(
        prog=program_name("snca_ext.train"),
        description="Train an SNCA embedding (Wu, Efros & Yu, ECCV 2018) and evaluate it by weighted "
        "kNN. With no argument: a small CNN on scikit-learn's digits. Unset recipe flags take the "
        "paper's values for the dataset (snca_ext/apps/train/config.py), or on --resume the "
        "checkpoint's.",
    )
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_optimisation_arguments(parser)
    _add_bank_arguments(parser)
    _add_evaluation_arguments(parser)
    _add_run_arguments(parser)
    _add_distributed_arguments(parser)
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the data group."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help="default: digits (embedded, no download)")
    data.add_argument(
        "--data",
        help="local data folder: cifar10 (holds cifar-10-batches-py/), imagefolder (train/, val/), "
        "fashion-mnist (the four IDX files; default /usr/share/datasets/fashion-mnist), omniglot (its "
        "zips or their folders: images_background_small1.zip, ..., images_evaluation.zip)",
    )
    data.add_argument("-j", "--workers", type=NON_NEGATIVE_INT, help="data loader processes")
    data.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="imagefolder: leave out the files that are not readable images or are decompression bombs "
        "(every header is checked before training; by default such a file stops the run, named)",
    )
    data.add_argument(
        "--train-labels",
        choices=("fine", "coarse"),
        help="coarse: train on the coarse classes (cifar100's 20 superclasses, fashion-mnist's 4 groups, "
        "omniglot's alphabets) "
        "and also evaluate kNN with the fine ones (sub-category discovery) (fine)",
    )
    data.add_argument(
        "--train-limit", type=POSITIVE_INT, metavar="N", help="train on the first N training examples only"
    )
    data.add_argument(
        "--test-limit", type=POSITIVE_INT, metavar="N", help="evaluate on the first N test examples only"
    )
    data.add_argument(
        "--holdout-classes",
        type=class_list_type,
        metavar="C,C,...",
        help="train without these classes; the final evaluation adds kNN and N-way K-shot accuracy on "
        "them (novel classes)",
    )

    data.add_argument(
        "--omniglot-train",
        type=_omniglot_splits,
        metavar="SPLIT,...",
        help=f"omniglot: train on the characters of these splits ({', '.join(OMNIGLOT_SPLITS)}; default: "
        "every split found in --data); every other character is a novel class, e.g. small1 leaves "
        "small2's Japanese_(katakana), Sanskrit and Tagalog novel",
    )
    data.add_argument(
        "--holdout-alphabets",
        type=_alphabets,
        metavar="NAME,...",
        help="omniglot: train without these alphabets (their folder names, e.g. Sanskrit,Tagalog); "
        "they join the novel classes",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the model and loss group."""
    model = parser.add_argument_group("model and loss")
    model.add_argument(
        "--arch",
        type=arch_type,
        metavar="ARCH",
        help=f"{', '.join(ARCHS)}, or timm:<name> for any timm model (pip install 'snca_ext[timm]'); "
        "digits: digits_cnn, cifar10: cifar_resnet18, imagefolder: resnet18",
    )
    model.add_argument(
        "--pretrained",
        metavar="PATH",
        help="timm:<name> only: start the backbone from this local weights file (.safetensors, .pth), "
        "read by timm's loader without unpickling; nothing is downloaded",
    )
    model.add_argument("--low-dim", type=POSITIVE_INT, help="feature dimension (128)")
    model.add_argument(
        "--loss",
        choices=("snca", "softmax", "cosine-softmax"),
        help="snca (default), or a baseline evaluated on the same normalised embedding: softmax, a "
        "linear classifier on the embedding trained by cross-entropy; cosine-softmax, the normalised "
        "softmax: cross-entropy of cosine logits cos(x, w_c) / T, with -t's T",
    )
    model.add_argument(
        "-t",
        "--temperature",
        "--nce-t",
        dest="temperature",
        type=TEMPERATURE,
        help="T of the loss's weights exp(cos / T), in (0, 10] (the recipe's: 0.05; digits 0.1)",
    )
    model.add_argument(
        "--margin", type=NON_NEGATIVE_FLOAT, help="margin in cosine units, divided by T for the loss (0)"
    )
    model.add_argument(
        "--backend", choices=("auto", "reference", "cpu", "cuda", "triton"), help="fused op backend (auto)"
    )
    model.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        help="mixed precision: the network's forward under torch.autocast in this dtype (fp16 with a "
        "gradient scaler); the loss accumulates in float32 (none)",
    )
    model.add_argument(
        "--channels-last", action="store_true", help="the network and its inputs in channels-last memory"
    )
    model.add_argument("--compile", action="store_true", help="torch.compile the network's training forward")


def _add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the optimisation group."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("-b", "--batch-size", type=POSITIVE_INT, help="the global batch")
    optim.add_argument(
        "--iter-size",
        type=POSITIVE_INT,
        help="accumulate this many batches per optimizer step (and bank update): a step equals one "
        "batch of iter-size x batch-size, e.g. -b 128 --iter-size 2 for deep networks on small GPUs (1)",
    )
    optim.add_argument("--lr", type=POSITIVE_FLOAT, help="initial learning rate (0.1)")
    optim.add_argument(
        "--lr-step", type=POSITIVE_INT, help="multiply the lr by --lr-gamma every this many epochs"
    )
    optim.add_argument("--lr-gamma", type=POSITIVE_FLOAT, help="lr decay factor (0.1)")
    optim.add_argument(
        "--epochs",
        type=POSITIVE_INT,
        help="the recipe's: " + ", ".join(f"{name} {recipe['epochs']}" for name, recipe in RECIPES.items()),
    )
    optim.add_argument("--weight-decay", "--wd", dest="weight_decay", type=NON_NEGATIVE_FLOAT)
    optim.add_argument("--sgd-momentum", type=FRACTION, help="SGD momentum (0.9)")
    optim.add_argument(
        "--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov SGD (on)"
    )
    optim.add_argument("--seed", type=NON_NEGATIVE_INT, help="seeds every random number generator (0)")


def _add_bank_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the memory bank group."""
    bank = parser.add_argument_group("memory bank")
    bank.add_argument(
        "--memory-momentum", "--nce-m", dest="memory_momentum", type=FRACTION, help="bank momentum (0.5)"
    )
    bank.add_argument(
        "--memory-schedule",
        type=_schedule,
        help="bank momentum milestones 'epoch:momentum,...' (imagefolder '80:0.8,120:0.9'; '' for none)",
    )
    bank.add_argument("--bank-dtype", choices=tuple(BANK_DTYPES), help="bank storage (float32)")
    bank.add_argument(
        "--fresh-batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the loss sees the batch's own bank rows holding its current features (the stored rows "
        "still updated by momentum); on in the omniglot recipe, off elsewhere",
    )


def _add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the evaluation group."""
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--knn-k", type=POSITIVE_INT, help="neighbours of the final kNN evaluation (30)")
    evaluation.add_argument(
        "--knn-sigma", type=POSITIVE_FLOAT, help="kNN vote temperature (default: --temperature)"
    )
    evaluation.add_argument(
        "--monitor-k", type=POSITIVE_INT, help="neighbours of the per-epoch kNN monitor (1)"
    )
    evaluation.add_argument(
        "--recompute-bank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="final kNN against features recomputed over the training set (default: on after "
        "training, off with --evaluate, which then uses the checkpoint's bank)",
    )
    evaluation.add_argument(
        "--fewshot-ways",
        type=int_list_type(minimum=2, what="classes per episode", example="20,5"),
        help="novel classes per few-shot episode, comma-separated (5; omniglot: 20,5, each episode's "
        "classes from one alphabet)",
    )
    evaluation.add_argument(
        "--fewshot-shots",
        type=int_list_type(minimum=1, what="shot counts", example="1,5"),
        default=(1, 5),
        help="support examples per class (1,5)",
    )
    evaluation.add_argument("--fewshot-episodes", type=POSITIVE_INT, default=1000, help="episodes (1000)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the run group."""
    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--out", help="run directory (default: runs/<dataset>-<time>; on --resume the checkpoint's)"
    )
    run_group.add_argument(
        "--resume", metavar="CHECKPOINT", help="continue (or with -e evaluate) from this checkpoint"
    )
    run_group.add_argument(
        "-e", "--evaluate", action="store_true", help="only evaluate the --resume checkpoint by kNN"
    )
    run_group.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoints that need unpickling (original format): unpickling can run code",
    )
    run_group.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ..."
    )
    run_group.add_argument("--threads", type=POSITIVE_INT, help="CPU threads of torch (digits: 1)")
    run_group.add_argument(
        "--stop-after-steps",
        type=POSITIVE_INT,
        help="stop like Ctrl-C after this many steps of this invocation (for time-limited job slots)",
    )
    run_group.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write TensorBoard scalars to DIR: the loss of every step; per epoch its mean loss, "
        "the kNN monitor, lr and memory momentum (pip install 'snca_ext[tensorboard]')",
    )
    run_group.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are off anyway when not a terminal)",
    )


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the distributed (under torchrun) group."""
    dist_group = parser.add_argument_group("distributed (under torchrun)")
    dist_group.add_argument(
        "--bank-sharding",
        action="store_true",
        help="split the memory bank in row blocks over the ranks (bank memory per rank / world size) "
        "instead of a whole copy per rank",
    )
    dist_group.add_argument(
        "--dist-timeout",
        type=POSITIVE_FLOAT,
        default=distributed.DEFAULT_TIMEOUT_S,
        help="seconds a collective may wait for the other ranks before the run stops with an error "
        "(a rank died or hung) (600)",
    )
