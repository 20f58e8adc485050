"""Evaluation of checkpoints over held-out tasks and benchmark files, into ``report.json`` / ``report.md`` / plots.

    make eval                                 # the default recipe's checkpoints: SFT, GRPO stage 1, stage 2
    python -m eval recipes/eval/tiny.yaml --checkpoints sft=runs/sft/tiny rl=runs/grpo/tiny

``eval.tasks`` holds the tasks and scorers (the same verifiers as ``rewards/``), ``eval.report`` the report and
plots, ``eval.run`` the command.
"""

from .tasks import Task, pass_at_k

__all__ = ["Task", "pass_at_k"]
