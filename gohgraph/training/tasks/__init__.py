"""The training tasks, registered by name: what :func:`gohgraph.training.trainer.train` trains.

``lm`` (decoder, next token), ``mlm`` (encoder, masked LM), ``classify`` (encoder, sequence
classification) and ``seq2seq`` (encoder-decoder). Each is a :class:`~.base.Task`: its family,
presets, data, batches, loss and evaluation; the loop is the same for all.
"""

from __future__ import annotations

from typing import Dict

from .base import Task
from .classify import ClassificationTask
from .lm import LanguageModelTask
from .mlm import MaskedLanguageModelTask
from .seq2seq import SequenceToSequenceTask

TASKS: Dict[str, Task] = {task.name: task for task in (LanguageModelTask(), MaskedLanguageModelTask(),
                                                        ClassificationTask(), SequenceToSequenceTask())}


def get_task(name: str) -> Task:
    """The registered task ``name``; a one-line error names the others."""
    if name not in TASKS:
        raise ValueError(f"objective {name!r} is not one of {list(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "get_task"]
