"""What the trainer records and how it is told to stop.

* :class:`MetricsLogger`: one row per logged step in ``run_dir/metrics.csv`` (and TensorBoard
  scalars when ``tensorboard`` is installed). On resume, rows past the resumed step (written by
  the crashed run after its last checkpoint) are dropped so the file matches the restored state.
* :func:`routing_summary`: cheap per-step routing numbers from the layers' routing records.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..analysis.stats.health import HEALTH_COLUMNS, routing_health
from ..analysis.stats.metrics import coefficient_of_variation
from ..config import GoHConfig
from .run_dir import RunDir

COLUMNS = ["step", "tokens", "lr", "loss", "lm_loss", "aux_loss", "aux_scale", "grad_norm", "val_loss",
           "tokens_per_s", "head_load_cv", "expert_load_cv", "active_heads", *HEALTH_COLUMNS]
# HEALTH_COLUMNS: the bounded routing-health scalars (gohgraph.analysis.stats.health), the same for any
# number of heads or experts; empty cells for a kind the model does not route
SOURCE_LOSS_PREFIX = "val_loss/"  # + source name: one validation loss per --data source


class MetricsLogger:
    """Append metric rows to ``metrics.csv`` (only where ``enabled``, i.e. on rank 0)."""

    def __init__(self, run: RunDir, start_step: int, enabled: bool = True, tensorboard: bool = True,
                 extra_columns: Sequence[str] = ()) -> None:
        """``extra_columns`` (e.g. ``val_loss/<source>`` of a multi-source run) follow ``val_loss``."""
        self.enabled, self.path, self._file, self._tb = enabled, run.metrics_file, None, None
        at = COLUMNS.index("val_loss") + 1
        self.columns = COLUMNS[:at] + [c for c in extra_columns if c not in COLUMNS] + COLUMNS[at:]
        if not enabled:
            return
        kept = self._rows_up_to(start_step) if start_step > 0 else []
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(run.tensorboard_dir))
            except ImportError:  # optional extra: pip install gohgraph[tensorboard]
                self._tb = None

    def _rows_up_to(self, step: int) -> List[Dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as handle:
            return [row for row in csv.DictReader(handle) if row.get("step", "").isdigit() and int(row["step"]) <= step]

    def log(self, **values: Optional[float]) -> None:
        if not self.enabled:
            return
        self._writer.writerow({k: ("" if v is None else _format(v)) for k, v in values.items()})
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if name != "step" and value is not None:
                    self._tb.add_scalar(name, value, values["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()


def source_loss_column(source: str) -> str:
    """The ``metrics.csv`` column (and TensorBoard tag) of one source's validation loss."""
    return f"{SOURCE_LOSS_PREFIX}{source}"


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """Rows of a ``metrics.csv`` as floats (empty and non-numeric cells left out)."""
    columns = read_metrics_columns(path)
    n_rows = max((len(values) for values in columns.values()), default=0)
    return [{name: values[i] for name, values in columns.items() if not math.isnan(values[i])}
            for i in range(n_rows)]


def read_metrics_columns(path: Path) -> Dict[str, List[float]]:
    """Columns of a metrics CSV (any, not only the trainer's) as float lists, ``nan`` for empty or
    non-numeric cells; a row with another number of cells than the header (cut short) is left out
    (:func:`check_metrics_csv` counts them). ``FileNotFoundError`` / ``ValueError`` naming the file
    when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics CSV {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise ValueError(f"metrics CSV {path} has no header row")
            columns: Dict[str, List[float]] = {name: [] for name in reader.fieldnames if name}
            for row in reader:
                if None in row or None in row.values():  # more or fewer cells than the header
                    continue
                for name in columns:
                    columns[name].append(_number(row.get(name)))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"metrics CSV {path} is not a readable UTF-8 CSV file ({err})") from None
    return columns


def check_metrics_csv(path: Path) -> str:
    """What is wrong with rows of a metrics CSV, in words (``""`` when every row is whole): rows
    with another number of cells than the header (a file cut mid-row) or a cell that is not a
    number. ``ValueError`` naming the file when it is not UTF-8 CSV or no row is usable."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or not any(header):
                raise ValueError(f"metrics CSV {path} has no header row")
            rows, bad = 0, []
            for row in reader:
                if not row:
                    continue
                rows += 1
                cells = [cell for cell in row if cell != ""]
                if len(row) != len(header):
                    bad.append(f"line {reader.line_num}: {len(row)} cells, the header has {len(header)}")
                elif any(math.isnan(_number(cell)) and cell.lower() != "nan" for cell in cells):
                    bad.append(f"line {reader.line_num}: a cell that is not a number")
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"metrics CSV {path} is not a readable UTF-8 CSV file ({err})") from None
    if rows and len(bad) == rows:
        raise ValueError(f"metrics CSV {path}: none of its {rows} rows is readable ({bad[0]})")
    if not bad:
        return ""
    return f"{len(bad)} of {rows} rows are malformed ({bad[0]}{', ...' if len(bad) > 1 else ''})"


def _number(cell: Optional[str]) -> float:
    try:
        return float(cell) if cell not in (None, "") else math.nan
    except ValueError:
        return math.nan


@torch.no_grad()
def routing_summary(routing: list, cfg: GoHConfig) -> Dict[str, Optional[float]]:
    """Mean over layers of the head-load and expert-load coefficient of variation (std / mean of
    how many tokens chose each *routed* node; 0 = perfectly even; shared heads and experts are
    always on and not counted), the mean active heads per token and the routing-health scalars
    (:func:`~gohgraph.analysis.stats.health.routing_health`; ``None`` where not defined)."""
    head_cvs, expert_cvs, active = [], [], []
    for layer in routing:
        active_heads = layer.head_gates > 0  # [batch, seq, heads]
        active.append(float(active_heads.sum(-1).float().mean()))
        if cfg.router != "dense" and cfg.n_routed_heads > 1:
            head_load = active_heads[..., cfg.n_shared_heads:].reshape(-1, cfg.n_routed_heads).sum(0)
            if head_load.sum() > 0:
                head_cvs.append(coefficient_of_variation(head_load))
        if layer.expert_indices is not None:
            # expert ids count routed experts only: n_routed_experts bins, never the shared ones
            expert_cvs.append(coefficient_of_variation(
                torch.bincount(layer.expert_indices.reshape(-1), minlength=cfg.n_routed_experts)))
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    health = routing_health(routing, n_shared_heads=cfg.n_shared_heads,
                            n_routed_experts=cfg.n_routed_experts if cfg.n_routed_experts > 0 else None)
    if cfg.router == "dense":  # the dense router's logits route nothing
        health.update({column: math.nan for column in HEALTH_COLUMNS if column.startswith("health/heads/")})
    return {"head_load_cv": mean(head_cvs), "expert_load_cv": mean(expert_cvs), "active_heads": mean(active),
            **{column: None if math.isnan(value) else value for column, value in health.items()}}
