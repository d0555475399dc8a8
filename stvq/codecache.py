"""Cached codes of a frozen encoder over a fixed data set: ``stvq quantize`` writes them and stage 2 reads
them, so neither runs the encoder again. The key hashes the encoder's weights and the data (spec, image
size, seed): new weights or other data give another key, never stale codes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from stvq.checkpoint import load_tensors, save_tensors, weights_fingerprint

CACHE_DIR = "codes"


def cache_key(encoder: torch.nn.Module, data: str, image_size: int, seed: int) -> str:
    return hashlib.sha256(json.dumps([data, image_size, seed, weights_fingerprint(encoder)]).encode()).hexdigest()[:16]


def cache_path(run: str | Path, key: str) -> Path:
    return Path(run) / CACHE_DIR / f"{key}.safetensors"


def load_codes(run: str | Path, key: str) -> torch.Tensor | None:
    """Codes (M, N, D) of dataset items 0..M-1, or None when nothing is cached under ``key``."""
    path = cache_path(run, key)
    return load_tensors(path)["codes"] if path.is_file() else None


def save_codes(run: str | Path, key: str, codes: torch.Tensor) -> Path:
    return save_tensors(cache_path(run, key), {"codes": codes}, metadata={"items": str(len(codes))})
