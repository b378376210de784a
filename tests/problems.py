"""The old path of ``helpers.problems``, for the two GPU-work test files that still import it
(test_triton.py, test_mixed_precision.py) until they import ``helpers.problems``; then this file
goes."""

from helpers.problems import loss_errors_allowed, make_problem

__all__ = ["loss_errors_allowed", "make_problem"]
