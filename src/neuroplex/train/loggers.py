"""Loggers: callbacks (neuroplex.train.callbacks) that copy a run's figures to other tools.

What each one receives (config section ``log``):

- every step: ``step/loss`` and ``step/lr``, and for each rewiring event
  ``plasticity/LAYER/KEY`` (pruned, grown, densities, cross links);
- every epoch: ``epoch/KEY`` for every number of the metrics.jsonl record (losses, accuracies,
  MoE routing loads ``stageN.load.i``, samples/s, ...), at the epoch's last step.

Files in the run directory: ``tensorboard/`` (event files), ``steps.csv`` (step, epoch, loss,
lr) and ``metrics.csv`` (the columns of metrics.jsonl, one row per epoch).

Resume: a resumed run logs the steps after its last checkpoint. steps.csv and metrics.csv are
cut back to the checkpoint first (like metrics.jsonl); TensorBoard gets a new event file that
starts with a purge marker at the first step logged again, so readers (TensorBoard,
``event_accumulator``) drop the killed session's later steps: every step shows once. W&B keeps
the values it had for steps it already saw (it ignores steps logged out of order); MLflow keeps
both values of a step logged twice.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from neuroplex.config import Config, LogConfig
from neuroplex.errors import ConfigError
from neuroplex.files import atomic_write_text, read_jsonl
from neuroplex.train.callbacks import Callback, StepLog

TENSORBOARD_DIR = "tensorboard"
STEPS_CSV = "steps.csv"
METRICS_CSV = "metrics.csv"
STEP_COLUMNS = ("step", "epoch", "loss", "lr")
PACKAGES = {  # config key -> (module imported, how to install it)
    "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'neuroplex[wandb]'"),
    "mlflow": ("mlflow", "pip install 'neuroplex[mlflow]'"),
}


def check_loggers(log: LogConfig) -> None:
    """ConfigError (one line) if a logger that ``log`` turns on cannot be imported."""
    for key, (module, install) in PACKAGES.items():
        if getattr(log, key):
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(
                    f"log.{key} = true: {module.split('.')[-1]} is not installed; {install} "
                    f"(or set log.{key}: false)"
                ) from None


def build_loggers(cfg: Config, run_dir: Path, done_steps: int) -> list[Callback]:
    """The loggers ``cfg.log`` turns on, for a run at ``done_steps`` completed steps."""
    check_loggers(cfg.log)
    loggers: list[Callback] = []
    if cfg.log.csv:
        loggers.append(CsvLogger(run_dir, done_steps))
    if cfg.log.tensorboard:
        loggers.append(TensorBoardLogger(run_dir / TENSORBOARD_DIR, done_steps))
    if cfg.log.wandb:
        loggers.append(WandbLogger(cfg, run_dir))
    if cfg.log.mlflow:
        loggers.append(MlflowLogger(cfg, run_dir))
    return loggers


def step_scalars(log: StepLog) -> dict[str, float]:
    """The numbers of one step: loss, lr, and each rewiring event's figures."""
    scalars = {"step/loss": log.loss, "step/lr": log.lr}
    for event in log.events:
        for key, value in numbers(event, skip=("step",)).items():
            scalars[f"plasticity/{event['layer']}/{key}"] = value
    return scalars


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Every number of a metrics.jsonl record but its step (the x axis)."""
    return {f"epoch/{key}": value for key, value in numbers(record, skip=("step",)).items()}


def numbers(record: dict[str, Any], skip: tuple[str, ...]) -> dict[str, float]:
    """The int, float and bool values of ``record`` as floats (None and text left out)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in skip and isinstance(value, (int, float))
    }


class CsvLogger(Callback):
    """``steps.csv`` (appended at each epoch end) and ``metrics.csv`` (rewritten from
    metrics.jsonl at each epoch end: its columns are every key metrics.jsonl holds)."""

    def __init__(self, run_dir: Path, done_steps: int) -> None:
        self.run_dir = run_dir
        self.rows: list[tuple[int, int, float, float]] = []
        rows = read_csv(run_dir / STEPS_CSV)
        kept = [r for r in rows if r["step"].isdigit() and int(r["step"]) <= done_steps]
        write_csv(run_dir / STEPS_CSV, STEP_COLUMNS, kept)
        self.write_metrics()

    def on_step(self, log: StepLog) -> None:
        self.rows.append((log.step, log.epoch, log.loss, log.lr))

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.flush()
        self.write_metrics()

    def on_end(self, summary: dict[str, Any] | None) -> None:
        self.flush()

    def flush(self) -> None:
        with open(self.run_dir / STEPS_CSV, "a", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(self.rows)
        self.rows = []

    def write_metrics(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        records = read_jsonl(path, "epoch") if path.exists() else []
        columns = list(dict.fromkeys(key for record in records for key in record))
        write_csv(self.run_dir / METRICS_CSV, columns, records)


def read_csv(path: Path) -> list[dict[str, str]]:
    """The complete rows of a CSV file this module wrote (a row cut short by a kill is
    dropped); [] if there is none."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(complete))
    return [row for row in reader if None not in row.values()]


def write_csv(path: Path, columns: tuple[str, ...] | list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


class TensorBoardLogger(Callback):
    """Scalars through ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, log_dir: Path, done_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        resumed = any(log_dir.glob("events.out.tfevents.*"))
        # the purge marker hides what an earlier session logged at steps >= done_steps + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=done_steps + 1 if resumed else None)

    def on_step(self, log: StepLog) -> None:
        for tag, value in step_scalars(log).items():
            self.writer.add_scalar(tag, value, log.step)

    def on_epoch(self, record: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def on_end(self, summary: dict[str, Any] | None) -> None:
        self.writer.close()


def stored_id(path: Path, make: Any) -> str:
    """The id saved in ``path`` (so a resumed run continues its tracking run), made once."""
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    value = str(make())
    atomic_write_text(path, value + "\n")
    return value


class WandbLogger(Callback):
    """Weights & Biases: one W&B run per run directory (its id kept in ``wandb_id``)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import wandb

        run_id = stored_id(run_dir / "wandb_id", wandb.util.generate_id)
        self.run = wandb.init(
            project=cfg.log.project,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=cfg.model_dump(mode="json"),
        )

    def on_step(self, log: StepLog) -> None:
        self.run.log(step_scalars(log), step=log.step)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.run.log(epoch_scalars(record), step=record["step"])

    def on_end(self, summary: dict[str, Any] | None) -> None:
        self.run.finish(exit_code=0 if summary and summary["status"] != "diverged" else 1)


class MlflowLogger(Callback):
    """MLflow: one MLflow run per run directory (its id kept in ``mlflow_run_id``), the config
    logged as an artifact."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(cfg.log.project)
        saved = run_dir / "mlflow_run_id"
        run_id = saved.read_text(encoding="utf-8").strip() if saved.is_file() else None
        run = mlflow.start_run(run_id=run_id, run_name=run_dir.name)
        stored_id(saved, lambda: run.info.run_id)
        if run_id is None:
            mlflow.log_artifact(str(run_dir / "config.yaml"))

    def on_step(self, log: StepLog) -> None:
        self.mlflow.log_metrics(step_scalars(log), step=log.step)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics(epoch_scalars(record), step=record["step"])

    def on_end(self, summary: dict[str, Any] | None) -> None:
        status = {"completed": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED"}
        self.mlflow.end_run(status=status.get(summary["status"], "FAILED") if summary else "FAILED")
