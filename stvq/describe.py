"""What ``stvq info`` shows of a model: its parameter counts per part (its config describes itself)."""

from __future__ import annotations

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
