"""``python -m snca_ext``: the same as ``python -m snca_ext.train``."""

from .apps.train.cli import main

if __name__ == "__main__":
    main()
