"""``python -m snca_ext.fewshot``: the command line of ``snca_ext.apps.fewshot``, kept at the path
users call (an entry point of the applications; ``import snca_ext`` does not load it). The metrics
themselves are the core's ``snca_ext.episodes``, re-exported here for the old import path."""

from .apps.fewshot import main, run
from .episodes import FewShotResult, few_shot_accuracy, sample_episodes

__all__ = ["FewShotResult", "few_shot_accuracy", "main", "run", "sample_episodes"]

if __name__ == "__main__":
    main()
