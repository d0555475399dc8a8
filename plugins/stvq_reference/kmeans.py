"""K-means codebook (Styled VQ stage 2, docs/model.md, "Training in two stages"): the frozen encoder's codes over a data set are
clustered with faiss (Lloyd's algorithm; Johnson, Douze, Jegou, "Billion-scale similarity search with
GPUs", 2017), and codes are snapped to their nearest centroid."""

from __future__ import annotations

import faiss
import torch

from stvq.errors import OptionRangeError, StvqError
from stvq.interfaces import FittableQuantizer, QuantizerOutput
from stvq_reference.codebook import CodebookQuantizer

#: faiss's ClusteringParameters hold counts in 32-bit integers.
FAISS_INT_MAX = 2**31 - 1

INIT_METHODS = {
    "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    "afk-mc2": faiss.ClusteringInitMethod_AFK_MC2,
    "random": faiss.ClusteringInitMethod_RANDOM,
}


class KMeansQuantizer(CodebookQuantizer, FittableQuantizer):
    """A codebook fitted once by :meth:`fit`, then fixed. Seeded with k-means++ by default: faiss's
    random seeding misses clusters even on well-separated data. The auxiliary loss is zero (the encoder is
    frozen in stage 2); the quantization error is in ``stats["mse"]``."""

    fitted: torch.Tensor  # a buffer

    def __init__(
        self,
        dim: int = 16,
        codebook_size: int = 8192,
        positions: int = 0,
        niter: int = 20,
        seed: int = 0,
        spherical: bool = False,
        max_points_per_centroid: int = 256,  # faiss sub-samples to K * this many points
        init: str = "kmeans++",  # "kmeans++" (Arthur & Vassilvitskii 2007), "afk-mc2" or "random"
        gpu: bool | None = None,  # None: use faiss GPUs when faiss-gpu is installed and sees one
    ) -> None:
        super().__init__(dim, codebook_size, positions)
        if init not in INIT_METHODS:
            raise StvqError(f"k-means init {init!r} is not one of {', '.join(INIT_METHODS)}")
        for name, value in (("niter", niter), ("max_points_per_centroid", max_points_per_centroid)):
            if not 1 <= value <= FAISS_INT_MAX:
                raise OptionRangeError(f"k-means {name} must lie in [1, {FAISS_INT_MAX:,}] (faiss holds it in a 32-bit integer), got {value:,}")
        self.init = init
        self.niter, self.seed, self.spherical = niter, seed, spherical
        self.max_points_per_centroid, self.gpu = max_points_per_centroid, gpu
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor) -> dict[str, float]:
        """Cluster ``vectors`` (..., [P,] dim) into the codebook; returns faiss's final objective."""
        grouped = self.group(vectors.detach().float().cpu())  # (G, M, D)
        if grouped.shape[1] < self.codebook_size:
            raise StvqError(f"k-means with K={self.codebook_size} needs at least K vectors per codebook, got {grouped.shape[1]}; use more images or a smaller K")
        use_gpu = faiss.get_num_gpus() > 0 if self.gpu is None else self.gpu
        objective = 0.0
        for g, x in enumerate(grouped):
            kmeans = faiss.Kmeans(
                self.dim,
                self.codebook_size,
                niter=self.niter,
                seed=self.seed + g,
                spherical=self.spherical,
                max_points_per_centroid=self.max_points_per_centroid,
                gpu=use_gpu,
                init_method=INIT_METHODS[self.init],
                verbose=False,
            )
            kmeans.train(x.contiguous().numpy())
            self.codebook[g] = torch.from_numpy(kmeans.centroids).to(self.codebook)
            objective += float(kmeans.obj[-1])  # type: ignore[index]  # faiss fills obj in train()
        self.fitted.fill_(True)
        return {"objective": objective}

    def assign(self, grouped: torch.Tensor) -> torch.Tensor:
        if not self.spherical:
            return super().assign(grouped)
        # Spherical k-means: the centroids are unit vectors; nearest = largest inner product.
        return torch.stack([(q @ c.T).argmax(-1) for q, c in zip(grouped, self.codebook)])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (..., [P,] dim) -> codes, ids (..., [P])."""
        if not bool(self.fitted):
            raise StvqError("the k-means codebook is empty: call fit() on encoder codes, or run `stvq quantize`")
        ids = self.assign(self.group(z.detach().float()))
        return self.output(z, ids, z, z.new_zeros(()))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, positions={self.positions}, spherical={self.spherical}"
