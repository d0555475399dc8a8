"""Codebook health, the same for every quantizer: usage, perplexity, dead codes, quantization error."""

from __future__ import annotations

import torch


def codebook_stats(ids: torch.Tensor, codebook_size: int, z: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> dict[str, float]:
    """Statistics of ``ids`` (any shape, values in [0, codebook_size)).

    usage: fraction of codewords used at least once; perplexity: exp of the entropy of the code
    distribution (codebook_size when uniform, 1 when collapsed); dead_codes: codewords never used;
    mse: mean squared distance between ``z`` and ``codes`` when both are given.
    """
    counts = torch.bincount(ids.detach().reshape(-1).cpu(), minlength=codebook_size).double()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    stats = {
        "usage": (counts > 0).double().mean().item(),
        "perplexity": entropy.exp().item(),
        "dead_codes": int((counts == 0).sum().item()),
    }
    if z is not None and codes is not None:
        stats["mse"] = (z.detach().float() - codes.detach().float()).pow(2).mean().item()
    return stats


def position_health(ids: torch.Tensor, vocab_size: int) -> dict[str, list]:
    """For each token position of ``ids`` (B, N): how many distinct ids it uses (``used``), the entropy of
    its id distribution in bits (``entropy_bits``) and its perplexity (2 ** entropy): a position whose codes
    collapse (a tail that carries nothing) shows few ids and low entropy."""
    ids = ids.detach().long().cpu()
    used, entropy = [], []
    for column in ids.T:
        counts = torch.bincount(column, minlength=vocab_size).double()
        probs = counts[counts > 0] / len(column)
        used.append(int((counts > 0).sum()))
        entropy.append(float(-(probs * probs.log2()).sum()))
    return {"used": used, "entropy_bits": entropy, "perplexity": [2.0**e for e in entropy]}
