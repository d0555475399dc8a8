"""Experiment trackers a training run also logs to, beside ``metrics.jsonl``: TensorBoard
(``--tensorboard``, event files in ``RUN/tensorboard/``) and Weights & Biases (``--wandb [PROJECT]``; with
``WANDB_MODE=offline`` its files stay in ``RUN/wandb/`` for ``wandb sync``). Each gets every log record's
numbers, the step's sample grid, the config once and the summary at the end; a resume continues the same
tracked run and drops what was logged after its checkpoint (TensorBoard purges; W&B is told the step)."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stvq.checkpoint import read_json, write_json
from stvq.errors import StvqError


class Tracker:
    """What a training loop calls: ``log`` after each record, ``close`` at the end (with the summary)."""

    def log(self, record: dict[str, Any], step: int, grid: Path | None) -> None:
        raise NotImplementedError

    def close(self, summary: dict[str, Any] | None = None) -> None:
        pass


@contextmanager
def closed_on_error(trackers: list[Tracker]) -> Iterator[list[Tracker]]:
    """Close every tracker where the block fails (a run that ends closes them with its summary)."""
    try:
        yield trackers
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric entries but the step."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker(Tracker):
    def __init__(self, run: Path, start: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise StvqError("--tensorboard needs the tensorboard package: pip install 'stvq[tensorboard]'") from None
        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=start + 1 if start else None)  # steps up to the checkpoint stay

    def log(self, record: dict[str, Any], step: int, grid: Path | None) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, step)
        if grid is not None:
            import numpy as np
            from PIL import Image

            with Image.open(grid) as image:
                self.writer.add_image("samples", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in ``project`` named after the run directory, its id kept in ``RUN/wandb.json`` so that a
    resume continues it (``resume="allow"``); files under ``RUN/wandb/``."""

    ID_FILE = "wandb.json"

    def __init__(self, run: Path, project: str, config: Any, start: int) -> None:
        try:
            import wandb
        except ImportError:
            raise StvqError("--wandb needs the wandb package: pip install 'stvq[wandb]'") from None
        self.wandb = wandb
        saved = run / self.ID_FILE
        run_id = str(read_json(saved, "delete it to start a new W&B run").get("id", "")) if saved.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)  # W&B run ids: lower-case letters and digits
            write_json(saved, {"id": run_id, "project": project})
        options = dataclasses.asdict(config)
        self.run = wandb.init(
            project=project,
            name=run.name,
            id=run_id,
            resume="allow",
            dir=str(run),
            config={k: str(v) if not isinstance(v, (int, float, str, bool, type(None), list, dict)) else v for k, v in options.items()},
        )
        self.start = start

    def log(self, record: dict[str, Any], step: int, grid: Path | None) -> None:
        if step <= self.start:  # a resumed run logs from its checkpoint on; W&B keeps steps increasing
            return
        values: dict[str, Any] = dict(numbers(record))
        if grid is not None:
            values["samples"] = self.wandb.Image(str(grid))
        self.run.log(values, step=step)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if summary:
            self.run.summary.update(numbers(summary))
        self.run.finish()
