"""A run directory: its layout, and every read and write of it, in one place (README, "Failure behaviour").

    train.json               the TrainConfig (read back by --resume)
    checkpoint.safetensors   model, optimizer and RNG state in one file (stvq.train writes and reads it)
    config.json, model.safetensors   the exported model: ``stvq.load_tokenizer(run)``
    metrics.jsonl            one JSON line per logged step
    samples/step_NNNNNN.png  validation images (top) above their reconstructions (bottom)
    summary.json             final numbers
    quantize.json            what ``stvq quantize`` fitted
    codes/KEY.safetensors    a frozen encoder's codes over a data set: ``stvq quantize`` writes them and
                             stage 2 reads them, so neither runs the encoder again

Every file is written atomically (``stvq.checkpoint``); one writer holds the directory's lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from stvq.checkpoint import atomic_write, load_tensors, read_json, save_tensors, weights_fingerprint, write_json
from stvq.config import WRITTEN_BEFORE, TrainConfig
from stvq.data import FileSpec
from stvq.errors import StvqError


def cache_key(encoder: torch.nn.Module, data: str, image_size: int, seed: int) -> str:
    """The key of an encoder's codes over a data set: new weights or other data give another key, never
    stale codes."""
    return hashlib.sha256(json.dumps([data, image_size, seed, weights_fingerprint(encoder)]).encode()).hexdigest()[:16]


class RunDir:
    """The files of one run directory ``path``."""

    TRAIN_CONFIG = "train.json"
    CHECKPOINT = "checkpoint.safetensors"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    QUANTIZE = "quantize.json"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    def sample(self, step: int) -> Path:
        """The grid of validation images and reconstructions at ``step``."""
        return self.path / "samples" / f"step_{step:06d}.png"

    def codes_path(self, key: str) -> Path:
        return self.path / "codes" / f"{key}.safetensors"

    # ------------------------------------------------------------------------------------ train.json

    def is_run(self) -> bool:
        return (self.path / self.TRAIN_CONFIG).is_file()

    def write_train_config(self, cfg: Any) -> None:
        write_json(self.path / self.TRAIN_CONFIG, dataclasses.asdict(cfg))

    def read_train_config(self, schema: type = TrainConfig) -> Any:
        """The run's config as a ``schema`` (:class:`TrainConfig`; :class:`PriorTrainConfig` for a prior)."""
        path = self.path / self.TRAIN_CONFIG
        if not path.is_file():
            raise StvqError(f"{self.path} is not a training run (no {self.TRAIN_CONFIG}); pass a directory made by `stvq train`")
        try:
            cfg = schema(**{**WRITTEN_BEFORE, **json.loads(path.read_text())})
        except StvqError as err:  # a field out of range: the file says so, not a flag
            raise StvqError(f"{path} is not a train.json that stvq wrote ({err}); start the run again in another directory") from None
        except (ValueError, TypeError) as err:  # not JSON, not an object, unknown or wrongly typed fields
            raise StvqError(f"{path} is not a train.json that stvq wrote ({type(err).__name__}: {err}); start the run again in another directory") from None
        if isinstance(getattr(cfg, "data", None), str):
            cfg.data = FileSpec(cfg.data, str(path))  # may name only local files (stvq.data.check_spec)
        return cfg

    # ------------------------------------------------------------------------------------- metrics

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / self.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / self.METRICS
        lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise StvqError(f"{path}: line {number} is not JSON; the log was edited: restore it or start the run in another directory") from None
                # the last line torn by a kill mid-append: dropped (a resume rewrites the log up to its checkpoint)
        return records

    def trim_metrics(self, last_step: int) -> float:
        """Drop log lines written after the checkpoint a resume starts from (a killed run may have logged
        on); returns the training seconds the last kept line had logged, for the resumed run to count on."""
        if not (self.path / self.METRICS).is_file():
            return 0.0
        kept = [record for record in self.read_metrics() if record["step"] <= last_step]
        atomic_write(self.path / self.METRICS, lambda tmp: tmp.write_text("".join(json.dumps(record) + "\n" for record in kept)))
        return kept[-1].get("seconds", 0.0) if kept else 0.0

    # --------------------------------------------------------------------------- summaries, codes

    def read_summary(self) -> dict[str, Any] | None:
        path = self.path / self.SUMMARY
        return read_json(path, "delete it and run the command again (it is rewritten at the end of a run)") if path.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / self.SUMMARY, summary)

    def write_quantize(self, result: dict[str, Any]) -> None:
        write_json(self.path / self.QUANTIZE, result)

    def load_codes(self, key: str) -> torch.Tensor | None:
        """Codes (M, N, D) of data set items 0..M-1, or None when nothing is cached under ``key``."""
        path = self.codes_path(key)
        return load_tensors(path)["codes"] if path.is_file() else None

    def save_codes(self, key: str, codes: torch.Tensor) -> Path:
        return save_tensors(self.codes_path(key), {"codes": codes}, metadata={"items": str(len(codes))})
