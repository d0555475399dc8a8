"""A run directory: its layout, and every read and write of it, in one place (docs/run-directory.md).

    train.json               the TrainConfig (read back by --resume)
    checkpoint.safetensors   model, optimizer and RNG state in one file (:func:`save_checkpoint`)
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
from safetensors import safe_open

from stvq.checkpoint import atomic_write, disk_error, load_tensors, parse_json, read_json, save_tensors, weights_fingerprint, write_json
from stvq.config import WRITTEN_BEFORE, FileSpec, TrainConfig
from stvq.errors import CheckpointError, StvqError, first_line


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
        fields = read_json(path, "start the run again in another directory")
        try:
            cfg = schema(**{**WRITTEN_BEFORE, **fields})
        except StvqError as err:  # a field out of range: the file says so, not a flag
            raise StvqError(f"{path} is not a train.json that stvq wrote ({err}); start the run again in another directory") from None
        except (ValueError, TypeError) as err:  # not JSON, not an object, unknown or wrongly typed fields
            raise StvqError(f"{path} is not a train.json that stvq wrote ({type(err).__name__}: {err}); start the run again in another directory") from None
        if isinstance(getattr(cfg, "data", None), str):
            cfg.data = FileSpec(cfg.data, str(path))  # may name only local files (stvq.data.check_spec)
        return cfg

    # ------------------------------------------------------------------------------------- metrics

    def log(self, record: dict[str, Any]) -> None:
        """Append one record; a disk that refuses it is one line (a torn last line is dropped on resume)."""
        try:
            with open(self.path / self.METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise disk_error(err, self.path / self.METRICS) or err from None

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / self.METRICS
        lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(parse_json(line))
            except ValueError:
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

    def load_codes(self, key: str, tokens: int, dim: int) -> torch.Tensor | None:
        """Codes (M, tokens, dim) of data set items 0..M-1, or None when nothing usable is cached under ``key``:
        a cache that is torn, of another shape or holds NaN is warned about once and computed again."""
        import warnings

        path = self.codes_path(key)
        if not path.is_file():
            return None
        try:
            codes = load_tensors(path).get("codes")
            if codes is None or codes.ndim != 3 or tuple(codes.shape[1:]) != (tokens, dim) or not codes.is_floating_point():
                raise StvqError(f"{path} holds no codes of shape (images, {tokens}, {dim})")
            if not torch.isfinite(codes).all():
                raise StvqError(f"{path} holds NaN or infinite codes")
        except StvqError as err:
            warnings.warn(f"the cached codes are unusable ({err}); encoding the images again", stacklevel=2)
            return None
        return codes

    def save_codes(self, key: str, codes: torch.Tensor) -> Path:
        return save_tensors(self.codes_path(key), {"codes": codes}, metadata={"items": str(len(codes))})


# ---------------------------------------------------------------------------------------- checkpoint


def _optim_prefix(name: str) -> tuple[str, str]:
    """(tensor prefix, metadata key) of a part's optimizer state; the model's keep their first names."""
    return ("optim", "param_groups") if name == "model" else (f"optim_{name}", f"param_groups.{name}")


def save_checkpoint(
    path: Path,
    parts: dict[str, torch.nn.Module],
    opts: dict[str, torch.optim.Optimizer],
    step: int,
    data_generator: torch.Generator,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every part's weights and, for those in ``opts``, optimizer state (the model, companions such as a
    discriminator, the weights' moving average), the RNG state and ``extra`` tensors (a stream's reader
    positions) in one safetensors file: one atomic rename, never a torn mix."""
    tensors = dict(extra or {})
    metadata = {"step": str(step)}
    for name, module in parts.items():
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        if name not in opts:
            continue
        prefix, groups = _optim_prefix(name)
        state = opts[name].state_dict()
        for index, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        metadata[groups] = json.dumps(state["param_groups"])
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    metadata["tensors"] = str(len(tensors))  # a resume checks that none went missing
    save_tensors(path, tensors, metadata)


def load_checkpoint(path: Path, parts: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], data_generator: torch.Generator) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from."""
    if not path.is_file():
        raise CheckpointError(f"no {path.name} in {path.parent}: the run never reached its first checkpoint; start it again")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        step = _step_of(metadata)
    except Exception as err:  # a torn file or a header that lies: safetensors raises several types
        raise CheckpointError(f"{path} is not a readable stvq checkpoint ({type(err).__name__}: {first_line(err)}); start the run again in another directory") from None
    if "tensors" in metadata and metadata["tensors"] != str(len(tensors)):
        raise CheckpointError(f"{path} holds {len(tensors):,} tensors where its header says {metadata['tensors']}: it was edited; start the run again in another directory")
    missing = [name for name in opts if _optim_prefix(name)[1] not in metadata]
    missing += [name for name in parts if not any(k.startswith(f"{name}.") for k in tensors)]
    if missing:
        raise CheckpointError(f"{path} holds no {missing[0]}: it was written by a run without one; resume with the run's own train.json")
    try:
        for name, module in parts.items():
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")})
            if name not in opts:
                continue
            prefix, groups = _optim_prefix(name)
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(f"{prefix}."):
                    _, index, entry = key.split(".", 2)
                    state.setdefault(int(index), {})[entry] = value
            opts[name].load_state_dict({"state": state, "param_groups": json.loads(metadata[groups])})
        torch.set_rng_state(tensors["rng.torch"])
        data_generator.set_state(tensors["rng.data"])
    except Exception as err:  # another model's tensors, missing entries: many types
        raise CheckpointError(f"{path} does not match this run ({type(err).__name__}: {first_line(err)}); start the run again in another directory") from None
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return step


def _step_of(metadata: dict[str, str] | None) -> int:
    """The step a checkpoint's header names: a whole number of 0 or more (a ``ValueError`` otherwise)."""
    step = int((metadata or {})["step"])
    if not 0 <= step < 2**62:
        raise ValueError(f"step {step} is not a step of a run")
    return step


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint holds, read from its header alone; None where there is no checkpoint."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return _step_of(f.metadata())
    except Exception as err:  # a torn or foreign file: safetensors and int() raise their own types
        raise CheckpointError(f"{path} is not a readable stvq checkpoint ({first_line(err)}); start the run again in another directory") from None
