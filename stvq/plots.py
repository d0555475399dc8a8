"""The figures stvq writes (matplotlib on the file-only Agg backend): prefix curves, what each token
position carries, factor-probe heat maps, a prior's bits per token position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_positions(result: dict[str, Any], path: Path) -> None:
    """Per token position: the entropy of its ids in bits (bars; ``result["positions"]``) and, where the
    prefix curve was measured, the marginal gain of each token in dB (line, right axis). Nothing to draw: no
    file."""
    health, prefix = result.get("positions"), result.get("prefix")
    if health is None and (prefix is None or "marginal_psnr" not in prefix):
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    if health is not None:
        ax.bar(range(1, len(health["entropy_bits"]) + 1), health["entropy_bits"], color="C0", alpha=0.6, label="entropy of the ids (bits)")
        ax.set_ylabel("entropy of the ids at the position (bits)")
    if prefix is not None and "marginal_psnr" in prefix:
        gain = ax.twinx()
        gain.plot(range(1, len(prefix["marginal_psnr"]) + 1), prefix["marginal_psnr"], "-o", ms=3, color="C3", label="marginal gain (dB)")
        gain.axhline(0, color="gray", lw=0.6)
        gain.set_ylabel("PSNR gained by token k over the first k - 1 (dB)")
        gain.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("token position k")
    ax.set_title(f"{result.get('name', '')}: what each token position carries")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_prefix(curves: dict[str, dict[str, list[float]]], path: Path, baseline: float | None = None) -> None:
    """One line per run for 'first n known' (solid) and 'last n known' (dashed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (name, curve) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(curve["n"], curve["prefix_psnr"], "-o", ms=3, color=color, label=f"{name}: first n tokens known")
        ax.plot(curve["n"], curve["suffix_psnr"], "--", color=color, alpha=0.7, label=f"{name}: last n tokens known")
        for n in (0, 4, len(curve["n"]) - 1):
            ax.annotate(f"{curve['prefix_psnr'][n]:.1f}", (n, curve["prefix_psnr"][n]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=color)
    if baseline is not None:
        ax.axhline(baseline, color="gray", lw=0.8, ls=":", label=f"mean image ({baseline:.1f} dB)")
    ax.set_xlabel("tokens known (n of 36; the others set to their mean code)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Prefix decoding: reconstruction from the first (or last) n tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_probe(probe: dict[str, Any], path: Path, title: str) -> None:
    """Two heat maps: each token alone (top), and the first n tokens together (bottom)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.6), dpi=120, sharex=True)
    panels = (
        (probe["scores"], "token position", f"{title}: linear probe per token (ordering score {probe['ordering_score']:+.2f}, over {sum(probe['encoded'])} encoded factors)"),
        (probe["cumulative"], "n - 1 (the first n tokens known together)", f"{title}: linear probe on the first n tokens together"),
    )
    for ax, (values, xlabel, heading) in zip(axes, panels):
        scores = np.array(values)
        image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(probe["factors"])), probe["factors"])
        ax.set_xticks(range(0, scores.shape[1], 2))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("factor (global to local)")
        for i, row in enumerate(scores):
            j = int(row.argmax())
            ax.text(j, i, f"{row[j]:.2f}", ha="center", va="center", fontsize=6, color="white" if row[j] < 0.6 else "black")
        ax.set_title(heading, fontsize=9)
        fig.colorbar(image, ax=ax, label="score (0 chance, 1 perfect)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bits(curves: dict[str, list[float]], path: Path) -> None:
    """Bits per token position, one line per prior."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, bits in curves.items():
        ax.plot(range(len(bits)), bits, marker=".", label=f"{name} ({sum(bits):.0f} bits/image)")
    ax.set_xlabel("token position")
    ax.set_ylabel("held-out NLL (bits)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
