"""``python -m snca_ext COMMAND [ARGS]``: the package's commands under one name.

``python -m snca_ext train ...`` is ``python -m snca_ext.train ...`` (and likewise ``export``,
``neighbors``, ``fewshot``). With no command it lists them and exits 2: a bare ``python -m
snca_ext`` must not start a training run nobody asked for.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "train": ("snca_ext.apps.train.cli", "train an embedding with SNCA (or the softmax baseline)"),
    "export": ("snca_ext.apps.export", "write the features of a trained network to a file"),
    "neighbors": ("snca_ext.apps.neighbors", "a browsable page of nearest neighbours"),
    "fewshot": ("snca_ext.apps.fewshot", "N-way K-shot accuracy of exported features"),
}


def usage() -> str:
    lines = [
        "usage: python -m snca_ext COMMAND [ARGS]  (python -m snca_ext COMMAND --help for its flags)",
        "",
    ]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{usage()}\n\npython -m snca_ext: unknown command {command!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.run(rest)


if __name__ == "__main__":
    sys.exit(main())
