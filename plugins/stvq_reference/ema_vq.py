"""EMA vector quantization: van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation
Learning", 2017 (appendix A.1), as used by VQ-VAE-2 (Razavi et al., 2019).

The codebook follows exponential moving averages of the encoder outputs assigned to each codeword (with
Laplace smoothing), the encoder is pulled toward its codeword by a commitment loss, and codewords that
fall out of use are restarted from recent encoder outputs.
"""

from __future__ import annotations

import faiss
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stvq.errors import ConfigError, OptionRangeError
from stvq.interfaces import QuantizerOutput
from stvq_reference.codebook import CodebookQuantizer


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


class EMAVectorQuantizer(CodebookQuantizer):
    cluster_size: torch.Tensor  # a buffer
    embed_sum: torch.Tensor  # a buffer
    initialized: torch.Tensor  # a buffer

    updates_in_forward = True  # its codebook moves in each training forward

    def __init__(
        self,
        dim: int = 16,
        codebook_size: int = 8192,
        positions: int = 0,
        decay: float = 0.99,
        eps: float = 1e-5,  # Laplace smoothing of the cluster sizes
        commitment: float = 0.25,  # weight of ||z - sg(q)||^2
        init: str = "batch",  # "batch": sample the first batch; "kmeans": faiss k-means on it
        dead_threshold: float = 0.03,  # restart codewords whose EMA count falls below this x the mean count
        l2_normalize: bool = False,  # cosine-similarity codebook: codes and codewords on the unit sphere
    ) -> None:
        super().__init__(dim, codebook_size, positions)
        if init not in ("batch", "kmeans"):
            raise ConfigError(f"ema-vq init {init!r} is not 'batch' or 'kmeans'")
        if not (0 <= decay < 1 and eps > 0 and commitment >= 0 and dead_threshold >= 0):
            raise OptionRangeError(f"ema-vq needs decay in [0, 1), eps > 0, commitment >= 0 and dead_threshold >= 0; got {decay}, {eps}, {commitment}, {dead_threshold}")
        self.decay, self.eps, self.commitment, self.init = decay, eps, commitment, init
        self.dead_threshold, self.l2_normalize = dead_threshold, l2_normalize
        groups = positions or 1
        self.register_buffer("cluster_size", torch.zeros(groups, codebook_size))  # (G, K) EMA counts
        self.register_buffer("embed_sum", torch.zeros(groups, codebook_size, dim))  # (G, K, D) EMA sums
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.last_restarts = 0

    def _sample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of x (M, D), without replacement when M >= n."""
        if len(x) >= n:
            return x[torch.randperm(len(x), device=x.device)[:n]]
        return x[torch.randint(len(x), (n,), device=x.device)]

    @torch.no_grad()
    def _initialize(self, grouped: torch.Tensor) -> None:
        for g, x in enumerate(grouped):
            if self.init == "kmeans" and len(x) >= self.codebook_size:
                km = faiss.Kmeans(self.dim, self.codebook_size, niter=10, seed=g, verbose=False)
                km.train(x.float().cpu().contiguous().numpy())
                self.codebook[g] = torch.from_numpy(km.centroids).to(self.codebook)
            else:
                self.codebook[g] = self._sample(x, self.codebook_size)
        if _distributed():
            dist.broadcast(self.codebook, 0)
        self.embed_sum.copy_(self.codebook)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, grouped: torch.Tensor, ids: torch.Tensor) -> None:
        g, k, d = self.codebook.shape
        counts = torch.zeros(g, k, device=grouped.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))
        sums = torch.zeros(g, k, d, device=grouped.device).scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, d), grouped)
        counts, sums = _all_reduce(counts), _all_reduce(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        total = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (total + k * self.eps) * total  # Laplace smoothing
        codebook = self.embed_sum / smoothed.unsqueeze(-1)
        self.codebook.copy_(F.normalize(codebook, dim=-1) if self.l2_normalize else codebook)
        self._restart_dead(grouped, total / k)

    @torch.no_grad()
    def _restart_dead(self, grouped: torch.Tensor, mean_count: torch.Tensor) -> None:
        """Codewords whose EMA count is below dead_threshold x the mean count take fresh encoder outputs."""
        dead = self.cluster_size < self.dead_threshold * mean_count  # (G, K)
        self.last_restarts = int(dead.sum())
        if not self.last_restarts:
            return
        for g in range(len(grouped)):
            n = int(dead[g].sum())
            if n:
                fresh = self._sample(grouped[g], n)
                if _distributed():
                    dist.broadcast(fresh, 0)
                self.codebook[g, dead[g]] = fresh
                self.embed_sum[g, dead[g]] = fresh * mean_count[g]
                self.cluster_size[g, dead[g]] = mean_count[g]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (..., [P,] dim) -> codes (straight-through), ids, commitment loss."""
        target = F.normalize(z, dim=-1) if self.l2_normalize else z
        grouped = self.group(target.detach().float())  # (G, M, D)
        if self.training and not bool(self.initialized):
            self._initialize(grouped)
        ids = self.assign(grouped)
        loss = self.commitment * F.mse_loss(target.float(), self.ungroup(self.lookup(ids), z.shape[:-1]))
        out = self.output(z, ids, target, loss)  # looks up before the update: codes match ids
        if self.training:
            self._update(grouped, ids)
            out.stats["restarts"] = self.last_restarts
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, positions={self.positions}, decay={self.decay}"
