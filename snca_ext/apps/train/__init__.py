"""The training program, ``python -m snca_ext.train``, split by concern: ``config`` (the typed run
configuration and the paper's recipes), ``cli`` (the command: parse and call), ``parser`` (its
arguments), ``session`` (one run: prepare, train, evaluate; the exit statuses), ``trainer`` (model,
bank, optimizer and one epoch), ``sampler`` (the resumable, distributed-aware order of examples),
``evaluation`` (kNN and novel-class evaluation, one code path for one or many processes),
``outputs`` (metrics CSV, curves, summary) and ``signals`` (stopping on Ctrl-C / SIGTERM; ending
the process after another rank failed)."""
