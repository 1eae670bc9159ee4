"""What the trainer records and how it is told to stop.

* :class:`MetricsLogger`: one row per logged step in ``run_dir/metrics.csv`` (and TensorBoard
  scalars when ``tensorboard`` is installed). On resume, rows past the resumed step (written by
  the crashed run after its last checkpoint) are dropped so the file matches the restored state.
* :func:`routing_summary`: cheap per-step routing numbers from the layers' routing records.
* :func:`stop_signals`: SIGINT/SIGTERM request a clean stop (finish the step, save, return);
  a second SIGINT interrupts at once.
"""

from __future__ import annotations

import contextlib
import csv
import signal
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

COLUMNS = ["step", "tokens", "lr", "loss", "lm_loss", "aux_loss", "aux_scale", "grad_norm", "val_loss",
           "tokens_per_s", "head_load_cv", "expert_load_cv", "active_heads"]


class MetricsLogger:
    """Append metric rows to ``metrics.csv`` (only where ``enabled``, i.e. on rank 0)."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled, self.path, self._file, self._tb = enabled, Path(run_dir) / "metrics.csv", None, None
        if not enabled:
            return
        kept = self._rows_up_to(start_step) if start_step > 0 else []
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
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


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """Rows of a ``metrics.csv`` as floats (empty cells left out)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


@torch.no_grad()
def routing_summary(routing: list, cfg) -> Dict[str, Optional[float]]:
    """Mean over layers of the head-load and expert-load coefficient of variation (std / mean of
    how many tokens chose each routed node; 0 = perfectly even) and the mean active heads per token."""
    head_cvs, expert_cvs, active = [], [], []
    for layer in routing:
        active_heads = layer.head_gates > 0  # [batch, seq, heads]
        active.append(active_heads.sum(-1).float().mean())
        if cfg.router != "dense" and cfg.n_routed_heads > 1:
            head_cvs.append(_cv(active_heads[..., cfg.n_shared_heads:].reshape(-1, cfg.n_routed_heads).sum(0).float()))
        if layer.expert_indices is not None:
            counts = torch.bincount(layer.expert_indices.reshape(-1), minlength=cfg.n_experts).float()
            expert_cvs.append(_cv(counts))
    mean = lambda values: float(torch.stack(values).mean()) if values else None  # noqa: E731
    return {"head_load_cv": mean(head_cvs), "expert_load_cv": mean(expert_cvs), "active_heads": mean(active)}


def _cv(counts: torch.Tensor) -> torch.Tensor:
    return counts.std(unbiased=False) / counts.mean().clamp_min(1e-9)


class StopRequest:
    requested: bool = False


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """While active, SIGINT/SIGTERM set ``.requested`` instead of killing the process.

    Signal handlers can only be installed from the main thread; elsewhere (a notebook worker
    thread, a test runner thread) the default behaviour is kept.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        stop.requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
