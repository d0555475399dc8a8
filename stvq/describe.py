"""What ``stvq info`` shows: a model's parameter counts per part, and its config's shapes."""

from __future__ import annotations

from typing import Any

import torch


def parameter_rows(model: torch.nn.Module) -> list[tuple[str, str, int, bool]]:
    """(part, modules, parameters, is_total) per child of each top-level part, then a subtotal per part,
    and a total."""
    rows = []
    for top_name, top in model.named_children():
        for name, child in top.named_children():
            count = sum(p.numel() for p in child.parameters())
            rows.append((f"{top_name}.{name}", str(len(child) if isinstance(child, torch.nn.ModuleList) else 1), count, False))
        for name, param in top.named_parameters(recurse=False):
            rows.append((f"{top_name}.{name}", "", param.numel(), False))
        rows.append((top_name, "", sum(p.numel() for p in top.parameters()), True))
    rows.append(("total", "", sum(p.numel() for p in model.parameters()), True))
    return rows


def shape_rows(cfg: Any) -> list[tuple[str, str]]:
    """The sizes of a :class:`stvq.config.ModelConfig` in words."""
    return [
        ("image", f"3 x {cfg.image_size} x {cfg.image_size}, patch {cfg.patch_size}"),
        ("tokens", f"{cfg.num_tokens} (2 x {cfg.condition_layers} condition layers)"),
        ("code_dim", str(cfg.code_dim)),
        ("encoder sequence", f"{cfg.seq_len} = {cfg.num_patches} patches + {cfg.num_tokens} special tokens"),
        ("decoder sequence", f"{cfg.seq_len} = {cfg.num_tokens} placeholders + {cfg.num_patches} positions"),
        ("width / heads", f"{cfg.width} / {cfg.heads}"),
        ("layers", f"encoder {cfg.encoder_layers}, decoder {cfg.condition_layers} condition + {cfg.plain_layers} plain"),
    ]
