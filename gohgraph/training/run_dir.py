"""A run directory: every file name of a training run, its readers and writers, and its lock.

One run of ``gohgraph train`` (any ``--objective``) writes one directory::

    run.lock                 who is writing the run now (pid, host, start time); gone when it ends
    train_config.json        the TrainConfig, written when the run starts
    model_config.json        the GoHConfig
    data.json                the data settings (``--data``, ``--tokenizer``), read again on resume
    objective.json           the task (``--objective``) and what it trains on (data, labels, seq_len)
    tokenizer.json           the BPE tokenizer, when the data has one
    metrics.csv              one row per logged step
    metrics.json             every evaluation (loss and the task's scores)
    tensorboard/             TensorBoard scalars, when tensorboard is installed
    checkpoints/latest       a one-line text file naming the newest checkpoint
    checkpoints/step_000100/ one training checkpoint (:mod:`gohgraph.training.checkpoint` writes it):
        config.json, model.safetensors, optimizer.safetensors, optimizer.json, rng.safetensors,
        training_state.json (written last: it marks the checkpoint complete)
    final/                   the finished model (``save_pretrained``: config.json, model.safetensors)

Saves killed mid-write leave staging folders (``checkpoints/.step_000100.<random>``) and temp files
(``.<name>.<random>.tmp``); :meth:`RunDir.remove_stale_staging` deletes them when a run starts.

The lock makes one process the writer of a run. It is created atomically, already holding its
content (a private file hard-linked into place, which fails if the lock exists), and holds JSON ``{"pid", "host", "started", ...}``. A second writer is refused with a
:class:`RunDirLockedError` (a ``ValueError``: the CLI prints it in one line) naming the directory
and the pid holding it. A lock whose pid is no longer alive on this host (a run that was killed)
is stale: it is taken over with a one-line notice. A lock from another host cannot be checked
and is never taken over (delete the file when that run is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

from ..config import GoHConfig
from ..data.tokenizers import TOKENIZER_FILE
from ..storage import CONFIG_NAME, CheckpointError, atomic_write_text, read_json, write_json

# the names inside one checkpoint directory (checkpoints/step_NNNNNN/); config.json and
# model.safetensors are the save_pretrained pair (gohgraph.storage)
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
TRAINING_STATE = "training_state.json"

STEP_DIR = re.compile(r"^step_(\d+)$")
_STAGING_DIR = re.compile(r"^\.step_\d+\..+")  # save_checkpoint's tempfile.mkdtemp prefix
_STAGING_FILE = re.compile(r"^\..+\.tmp$")  # storage.atomic_write's temp files (and a lock being taken over)
_LOCK_TRIES = 5  # attempts to create the lock while others release or take it over
# how long a lock file may stay empty: the holder writes it right after creating it
_LOCK_WRITE_GRACE_S = 2.0

Notice = Callable[[str], None]


class RunDirLockedError(ValueError):
    """Another live process is writing the run directory."""


def step_dir_name(step: int) -> str:
    """``100`` -> ``"step_000100"``: the folder of the checkpoint at optimizer step ``step``."""
    return f"step_{step:06d}"


class RunDir:
    """The files of one run directory (module docstring). Paths are attributes; nothing is
    created until something is written."""

    LOCK = "run.lock"
    TRAIN_CONFIG = "train_config.json"
    MODEL_CONFIG = "model_config.json"
    DATA = "data.json"
    OBJECTIVE = "objective.json"
    TOKENIZER = TOKENIZER_FILE
    METRICS = "metrics.csv"
    EVALUATIONS = "metrics.json"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    LATEST = "latest"
    FINAL = "final"

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ names
    @property
    def lock_file(self) -> Path:
        return self.path / self.LOCK

    @property
    def train_config_file(self) -> Path:
        return self.path / self.TRAIN_CONFIG

    @property
    def model_config_file(self) -> Path:
        return self.path / self.MODEL_CONFIG

    @property
    def data_file(self) -> Path:
        return self.path / self.DATA

    @property
    def objective_file(self) -> Path:
        return self.path / self.OBJECTIVE

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def evaluations_file(self) -> Path:
        return self.path / self.EVALUATIONS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def latest_pointer(self) -> Path:
        return self.checkpoints_dir / self.LATEST

    @property
    def final_dir(self) -> Path:
        return self.path / self.FINAL

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dir_name(step)

    # ------------------------------------------------------------------ what the run holds
    def is_run(self) -> bool:
        """Whether this is a training run's directory (it has a ``train_config.json``)."""
        return self.train_config_file.is_file()

    def has_checkpoints(self) -> bool:
        """Whether ``checkpoints/`` holds anything (complete or not)."""
        return self.checkpoints_dir.is_dir() and any(self.checkpoints_dir.iterdir())

    def step_dirs(self) -> List[Path]:
        """The ``checkpoints/step_*`` folders, oldest first (complete or not)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def latest_checkpoint(self) -> Optional[Path]:
        """The checkpoint ``checkpoints/latest`` names; ``None`` if the run has none yet.

        Without a pointer (a crash between the rename and the pointer write of the very first
        checkpoint) the highest complete ``step_*`` directory is used.
        """
        pointer = self.latest_pointer
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            if not STEP_DIR.match(name):
                raise CheckpointError(f"{pointer} is corrupt: {name[:40]!r} is not a step_NNNNNN directory name")
            target = self.checkpoints_dir / name
            if not target.is_dir():
                raise CheckpointError(f"{pointer} names {name}, which does not exist")
            return target
        complete = [p for p in self.step_dirs() if (p / TRAINING_STATE).is_file()]
        return complete[-1] if complete else None

    def newest_model(self) -> Optional[Path]:
        """The newest complete model of the run: ``final/`` or ``checkpoints/latest``, whichever was
        completed last (``None`` if neither exists). A resumed run that was interrupted is read at
        its latest step, not at the older ``final/`` of the run it continued."""
        candidates = []
        if (self.final_dir / CONFIG_NAME).is_file():
            candidates.append((self.final_dir / CONFIG_NAME, self.final_dir))
        found = self.latest_checkpoint() if self.checkpoints_dir.is_dir() else None
        if found is not None:
            candidates.append((found / TRAINING_STATE, found))
        if not candidates:
            return None
        # each model's completion marker is the file written last, so its time is when it was complete
        return max(candidates, key=lambda marker_and_dir: marker_and_dir[0].stat().st_mtime_ns)[1]

    @classmethod
    def of_checkpoint(cls, directory: Union[str, Path]) -> Optional["RunDir"]:
        """The run a model directory belongs to (``run``, ``run/final`` or ``run/checkpoints/step_N``), if any."""
        directory = Path(directory)
        for candidate in (directory, directory.parent, directory.parent.parent):
            if cls(candidate).is_run():
                return cls(candidate)
        return None

    # ------------------------------------------------------------------ readers and writers
    def write_train_config(self, train_config) -> Path:
        return atomic_write_text(self.train_config_file, train_config.to_json() + "\n")

    def read_train_config(self) -> dict:
        """The saved TrainConfig fields (``{}`` when the run has none)."""
        return _read_json_or_empty(self.train_config_file)

    def write_model_config(self, model_config: GoHConfig) -> Path:
        return atomic_write_text(self.model_config_file, model_config.to_json() + "\n")

    def write_data_settings(self, settings: dict) -> Path:
        return write_json(self.data_file, settings)

    def read_data_settings(self, default: Optional[dict] = None) -> dict:
        """The LM run's ``data.json`` (``default``, else ``{}``, when it has none)."""
        return read_json(self.data_file) if self.data_file.is_file() else dict(default or {})

    def write_objective(self, settings: dict) -> Path:
        return write_json(self.objective_file, settings)

    def read_objective(self) -> dict:
        """The objective run's ``objective.json`` (``{}`` outside such a run)."""
        return read_json(self.objective_file) if self.objective_file.is_file() else {}

    def task_name(self) -> str:
        """The ``--objective`` the run trains (``lm`` for runs from before ``objective.json``)."""
        return self.read_objective().get("objective", "lm")

    def is_objective_run(self) -> bool:
        """Whether the run trains another task than ``lm`` (an encoder or encoder-decoder objective)."""
        return self.task_name() != "lm"

    def write_evaluations(self, history: List[Dict[str, float]]) -> Path:
        return write_json(self.evaluations_file, history)

    # ------------------------------------------------------------------ staging left by killed saves
    def remove_stale_staging(self) -> List[Path]:
        """Delete what saves killed mid-write (SIGKILL, power loss) left: staging folders of
        checkpoints and temp files of atomic writes. Returns what was removed.

        Only called by the run's writer holding the lock, so nothing removed is in use.
        """
        removed = []
        folders = [self.path, self.checkpoints_dir, self.final_dir, *self.step_dirs()]
        if self.checkpoints_dir.is_dir():
            for staging in self.checkpoints_dir.iterdir():
                if staging.is_dir() and _STAGING_DIR.match(staging.name):
                    shutil.rmtree(staging, ignore_errors=True)
                    removed.append(staging)
        for folder in folders:
            if folder.is_dir():
                for leftover in folder.iterdir():
                    if leftover.is_file() and _STAGING_FILE.match(leftover.name):
                        leftover.unlink(missing_ok=True)
                        removed.append(leftover)
        return removed

    # ------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def lock(self, notice: Optional[Notice] = None) -> Iterator["RunDir"]:
        """Hold the run's lock for the ``with`` block (module docstring); released on return, on
        errors and on Ctrl-C. Re-entrant within one process (the CLI takes it before its own
        writes, the trainer again). ``notice`` receives the one line of a stale-lock takeover
        (default: stderr). A directory the lock created is removed again if nothing else was
        written into it."""
        key = str(self.lock_file.resolve())
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield self
            finally:
                _HELD[key] -= 1
            return
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            _acquire(self, notice or _stderr)
        except BaseException:
            if created:
                _remove_if_empty(self.path)
            raise
        _HELD[key] = 1
        try:
            yield self
        finally:
            del _HELD[key]
            self.lock_file.unlink(missing_ok=True)
            if created:
                _remove_if_empty(self.path)

    def lock_holder(self) -> Optional[dict]:
        """The lock file's contents (``None`` when nobody holds the lock; ``{}`` if unreadable)."""
        try:
            return _parse_lock(self.lock_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None


# ---------------------------------------------------------------------- lock helpers
_HELD: Dict[str, int] = {}  # locks this process holds -> how many nested holds


def _acquire(run: RunDir, notice: Notice) -> None:
    path = run.lock_file
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_LOCK_TRIES):
        try:
            _create_with_content(path, json.dumps(_this_process()) + "\n")
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:  # released between our create and our read
                continue
            why = _stale_reason(holder)
            if why is None:
                raise RunDirLockedError(_refusal(run, holder)) from None
            if _take_over(path, holder):
                notice(f"note: took over {path}: {why}")
            continue
        return
    raise RunDirLockedError(f"run dir {run.path}: could not take {path} in {_LOCK_TRIES} attempts (other "
                            "processes keep taking it); wait for them, or choose another --name/--run-dir")


def _create_with_content(path: Path, text: str) -> None:
    """Create ``path`` holding ``text`` in one atomic step, or raise ``FileExistsError``: the content
    is written to a private file first and hard-linked into place, so no other process ever reads
    the lock empty (a holder paused between creating and writing it would look dead)."""
    fd, private = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(private, path)
    finally:
        os.unlink(private)


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "process_start": _process_start(os.getpid()), "command": " ".join(sys.argv)[:300]}


def _read_holder(path: Path) -> Optional[dict]:
    """The lock's JSON, waiting briefly for a holder that has created it but not yet written it;
    ``{}`` for a lock that stays empty or damaged (its writer was killed), ``None`` once it is gone."""
    deadline = time.monotonic() + _LOCK_WRITE_GRACE_S
    while True:
        try:
            holder = _parse_lock(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        if holder or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)


def _parse_lock(text: str) -> dict:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else {}


def _stale_reason(holder: dict) -> Optional[str]:
    """Why the lock of ``holder`` is stale, or ``None`` when its process may still be running."""
    if not holder:
        return "the lock file is empty or damaged (its writer was killed while taking it)"
    if holder.get("host") != socket.gethostname():
        return None  # another machine's process cannot be checked from here
    pid, who = holder["pid"], f"pid {holder['pid']} (started {holder.get('started', '?')})"
    if pid == os.getpid():  # this process holds no such lock (_HELD), so an earlier process with our pid left it
        return f"{who} left it and that process is gone"
    if not _pid_alive(pid):
        return f"{who} is no longer running"
    recorded, now = holder.get("process_start"), _process_start(pid)
    if recorded is not None and now is not None and recorded != now:
        return f"{who} is no longer running (its pid belongs to another process now)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _process_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux ``/proc``; ``None`` elsewhere):
    with the pid it tells a recycled pid from the process that took the lock."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _take_over(path: Path, stale: dict) -> bool:
    """Remove the stale lock ``stale`` (read from ``path``). Renamed aside first, so that of two
    processes taking it over at once only one removes it; if what was renamed is not the stale
    lock any more (someone took it over in between), it is put back."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        moved = _parse_lock(aside.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    if moved != stale:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # never over a lock created meanwhile
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _refusal(run: RunDir, holder: dict) -> str:
    where = holder.get("host", "?")
    since = holder.get("started", "?")
    if where == socket.gethostname():
        return (f"run dir {run.path} is in use: pid {holder['pid']} (started {since}) is writing it; wait for it "
                "to finish, or choose another --name/--run-dir")
    return (f"run dir {run.path} is in use: pid {holder['pid']} on host {where} (started {since}) holds "
            f"{run.lock_file}; wait for it, or delete that file if the run on {where} is gone")


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _read_json_or_empty(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_run_file(checkpoint: Union[str, Path], name: str, levels: int = 2) -> Optional[Path]:
    """``name`` in the model directory ``checkpoint`` or up to ``levels`` parents
    (``runs/<run>/checkpoints/step_N`` -> ``runs/<run>``)."""
    directory = Path(checkpoint).resolve()
    for candidate in [directory, *directory.parents][:levels + 1]:
        if (candidate / name).is_file():
            return candidate / name
    return None
