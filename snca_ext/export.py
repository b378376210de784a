"""``python -m snca_ext.export``: the command line of ``snca_ext.apps.export``, kept at the path users
call (an entry point of the applications, not part of the core; ``import snca_ext`` does not
load it)."""

from .apps.export import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
