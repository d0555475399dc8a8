"""What the codebook quantizers (k-means, EMA VQ) share: a (groups, K, dim) codebook, shared by every
token position (one group) or one per position, and nearest-codeword search through faiss."""

from __future__ import annotations

import faiss
import torch
from einops import rearrange

from stvq.codebook_stats import codebook_stats
from stvq.errors import StvqError
from stvq.interfaces import Quantizer, QuantizerOutput


def nearest(queries: torch.Tensor, codebook: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest row of ``codebook`` (K, D) for each row of ``queries`` (M, D), by L2 distance.

    CPU: ``faiss.knn`` (blocked brute force: no M x K distance matrix). CUDA: torch in chunks of ``chunk``
    queries, so the codes never leave the GPU.
    """
    if queries.is_cuda:
        sq = codebook.pow(2).sum(-1)  # (K,)
        return torch.cat([(sq - 2 * q @ codebook.T).argmin(-1) for q in queries.split(chunk)])
    q = queries.detach().float().contiguous().numpy()
    c = codebook.detach().float().contiguous().numpy()
    _, ids = faiss.knn(q, c, 1)
    return torch.from_numpy(ids[:, 0]).long()


class CodebookQuantizer(Quantizer):
    """Base for quantizers with an explicit codebook. ``positions=0`` shares one codebook across token
    positions; ``positions=N`` gives each of the N positions (the second-last axis of z) its own, and ids
    then index the position's codebook (all ids stay in [0, codebook_size))."""

    codebook: torch.Tensor  # a buffer

    def __init__(self, dim: int, codebook_size: int, positions: int = 0) -> None:
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise StvqError(f"codebook_size and dim must be positive, got {codebook_size} and {dim}")
        self.dim, self.codebook_size, self.positions = dim, codebook_size, positions
        self.register_buffer("codebook", torch.zeros(positions or 1, codebook_size, dim))  # (G, K, D)

    def group(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., [P,] D) -> (G, M, D): one row of queries per codebook."""
        if z.shape[-1] != self.dim:
            raise StvqError(f"expected codes of width {self.dim} in the last axis, got shape {tuple(z.shape)}")
        if not self.positions:
            return rearrange(z, "... d -> 1 (...) d")
        if z.ndim < 2 or z.shape[-2] != self.positions:
            raise StvqError(f"per-position codebooks need codes (..., {self.positions}, {self.dim}), got {tuple(z.shape)}")
        return rearrange(z, "... p d -> p (...) d")

    def ungroup(self, t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`group`: (G, M, *rest) -> (*lead, *rest), ``lead`` = z.shape[:-1]."""
        if self.positions:
            t = rearrange(t, "p m ... -> m p ...")
        return t.reshape(*lead, *t.shape[2:])

    def assign(self, grouped: torch.Tensor) -> torch.Tensor:
        """(G, M, D) -> ids (G, M)."""
        return torch.stack([nearest(q, c) for q, c in zip(grouped, self.codebook)]).to(grouped.device)

    def lookup(self, grouped_ids: torch.Tensor) -> torch.Tensor:
        """ids (G, M) -> codewords (G, M, D)."""
        return torch.gather(self.codebook, 1, grouped_ids.unsqueeze(-1).expand(-1, -1, self.dim))

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        grouped = rearrange(ids, "... -> 1 (...)") if not self.positions else rearrange(ids, "... p -> p (...)")
        return self.ungroup(self.lookup(grouped.to(self.codebook.device)), ids.shape)

    def output(self, z: torch.Tensor, grouped_ids: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> QuantizerOutput:
        """Assemble the output: straight-through codes toward ``target`` (z, or z normalised)."""
        quantized = self.ungroup(self.lookup(grouped_ids), z.shape[:-1]).to(z.dtype)
        ids = self.ungroup(grouped_ids, z.shape[:-1])
        codes = target + (quantized - target).detach() if target.requires_grad else quantized  # exact in eval
        if self.positions:  # one table per position: average its health over positions
            per = [codebook_stats(ids[..., p], self.codebook_size) for p in range(self.positions)]
            stats = {key: sum(s[key] for s in per) / len(per) for key in ("usage", "perplexity")}
            stats["dead_codes"] = sum(s["dead_codes"] for s in per)
            stats["mse"] = codebook_stats(ids, self.codebook_size, target, quantized)["mse"]
        else:
            stats = codebook_stats(ids, self.codebook_size, target, quantized)
        return QuantizerOutput(codes, ids, loss, stats)
