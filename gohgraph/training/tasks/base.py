"""What the one training loop (:mod:`gohgraph.training.trainer`) asks of a task.

A task is a registered spec, not a loop of its own (torchtitan's ``TrainSpec``, Hugging Face's
``Trainer`` with a model's own loss): the loop owns devices, precision, accumulation, data and
tensor parallelism, compile, checkpoints, metrics and signals; the task says

* which model family it trains and from which presets (``presets``: name -> ``(GoHConfig kwargs,
  TrainConfig kwargs)``);
* what one training micro-batch is: the function :meth:`Task.training_batches` returns gives the
  keyword arguments of ``model(**batch)``, a function of ``(seed, step, micro_step)`` alone, of which data rank ``r``
  of ``R`` takes the ``r``-th contiguous share of rows, so a resumed run and ``R`` ranks read
  exactly what one uninterrupted process reads;
* its loss: the output field :attr:`Task.loss_field` (a mean over :meth:`Task.loss_terms` terms
  of the batch: predicted tokens, masked positions, texts or target tokens);
* how it is evaluated (:meth:`Task.evaluate`: ``{"loss": nats, score: value, ...}``) and which
  ``metrics.csv`` columns the scores go to (:meth:`Task.evaluation_columns`).

The loop weights micro-batch ``i`` of the step by ``n_i * R / N`` (``n_i`` its loss terms, ``N``
those of the whole step over every micro-batch and rank), so the step's gradient is that of the
mean over all its terms: ``--grad-accum 2`` equals a batch twice as large and ``R`` ranks equal one
process, also where micro-batches hold different numbers of terms (masked LM, padded targets).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ...config import GoHConfig
from ...models.families import FAMILIES, Family
from ..config import TrainConfig

PresetPair = Tuple[Dict[str, Any], Dict[str, Any]]
Batch = Dict[str, torch.Tensor]
BatchSource = Callable[[int, int, int, int], Batch]


class Task:
    """One training objective (module docstring). Subclasses set the class attributes and
    implement the methods; instances hold no state, so one registered instance serves every run."""

    name: str = ""
    model_type: str = ""  # the GoHConfig.model_type of the family it trains
    presets: Dict[str, PresetPair] = {}
    loss_field: str = ""  # the output field of the objective's own loss (without the routing losses)
    loss_column: str = "lm_loss"  # its metrics.csv column
    rows: str = "sequences"  # what one row of a batch is, for messages
    token_cache: bool = False  # its data is tokenized text kept in a token cache (--cache-dir)
    recursion: bool = False  # its family can recurse (Mixture-of-Recursions: recursion_warmup_steps)

    @property
    def family(self) -> Family:
        """The model family the task trains (:mod:`gohgraph.models.families`)."""
        return FAMILIES[self.model_type]

    @property
    def model_class(self) -> type:
        """The model class of the family the task trains."""
        return self.family.model_class

    # ------------------------------------------------------------------ data
    def load_data(self, settings: Dict[str, Any], cache_dir, tc: TrainConfig, cfg: GoHConfig):
        """The task's training and validation data from ``settings`` (``{"data": path | None,
        "tokenizer": spec, ...}``, as saved in ``data.json``)."""
        raise NotImplementedError

    def fit_model_config(self, cfg: GoHConfig, data, tc: TrainConfig, explicit: set, init_from) -> GoHConfig:
        """``cfg`` sized to ``data`` (vocabulary, positions, labels); fields the user set
        (``explicit``) or a continued model's (``init_from``) must fit as they are."""
        raise NotImplementedError

    def continued_model_config(self, model_kwargs: Dict[str, Any], directory) -> Dict[str, Any]:
        """The config of the saved model at ``directory`` (``--init-from``) as this task's start;
        a model of another family is refused in one line."""
        if FAMILIES.get(model_kwargs["model_type"]) is not self.family:
            raise ValueError(f"--init-from {directory} holds a model_type={model_kwargs['model_type']!r} model; "
                             f"--objective {self.name} continues {self.model_type} models")
        return model_kwargs

    def check_model_fits(self, cfg: GoHConfig, data, tc: TrainConfig) -> None:
        """Refuse, in one line, a model that cannot read ``data`` (vocabulary, lengths, labels)."""
        raise NotImplementedError

    def describe_data(self, data) -> str:
        """What the data is, for the checkpoint's training state and the run's summary."""
        return str(data.source)

    def save_data_files(self, directory, data) -> None:
        """Write what a reader of the model needs of the data beside it (a BPE tokenizer)."""

    def run_settings(self, data) -> Dict[str, Any]:
        """What ``objective.json`` records of the data beyond its settings (e.g. label names)."""
        return {}

    def check_same_data(self, saved: Dict[str, Any], data, trained: str) -> None:
        """Refuse ``data`` whose :meth:`run_settings` differ from those ``saved`` in the run's
        ``objective.json`` (the model depends on them: a classifier's labels); ``trained`` names
        what was trained on them, for the message."""
        for key, value in self.run_settings(data).items():
            if key in saved and saved[key] != value:
                raise ValueError(f"the data's {key} {value[:8]} are not the ones {trained} was trained on "
                                 f"({saved[key][:8]})")

    # ------------------------------------------------------------------ training
    def training_batches(self, data, tc: TrainConfig) -> BatchSource:
        """``(step, micro_step, rank, ranks) -> batch``: data rank ``rank``'s share of micro-batch
        ``micro_step`` of optimizer step ``step``, the keyword arguments of ``model(**batch)``, on
        CPU. Called once per run; the function may keep a cursor (epochs) but its batches depend
        on the arguments alone."""
        raise NotImplementedError

    def loss_terms(self, batch: Batch) -> int:
        """How many terms the batch's loss is the mean of."""
        raise NotImplementedError

    def batch_tokens(self, batch: Batch) -> int:
        """The tokens a batch trains on, for ``tokens_seen`` and tokens/s: its input ids, padding included."""
        return int(batch["input_ids"].numel())

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: torch.nn.Module, data, tc: TrainConfig, max_batches: Optional[int]) -> Dict[str, float]:
        """``{"loss": nats, ...scores}`` on the validation split, over ``max_batches`` batches
        (``None``: all of it), in eval mode; the model's mode is restored."""
        raise NotImplementedError

    def evaluation_columns(self, data) -> Dict[str, str]:
        """Evaluation key -> ``metrics.csv`` column, besides ``loss`` (``val_loss``)."""
        return {}

    def final_lines(self, model: torch.nn.Module, data, tc: TrainConfig) -> List[str]:
        """Lines the CLI prints after a finished run, beyond the periodic evaluation's (none by default)."""
        return []

    def summary(self, metrics: Dict[str, float], data, cfg: GoHConfig) -> List[str]:
        """Lines the CLI prints of the final evaluation."""
        return [f"validation loss: {metrics['loss']:.4f} nats/token"]


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device``."""
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def rank_rows(batch: Batch, rank: int, ranks: int) -> Batch:
    """Rank ``rank``'s contiguous share of ``batch``'s rows (every tensor is ``[rows, ...]``)."""
    if ranks == 1:
        return batch
    rows = next(iter(batch.values())).shape[0]
    if rows % ranks:
        raise ValueError(f"a batch of {rows} rows cannot be split over {ranks} data ranks")
    share = rows // ranks
    return {name: value[rank * share:(rank + 1) * share] for name, value in batch.items()}
