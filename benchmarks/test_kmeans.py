"""Stage-2 codebook fitting at the default size: k-means with K = 8192 on 720k x 16 float32 vectors
(20,000 images x 36 tokens). Ours (the kmeans plugin) against a direct faiss call with the same settings
(the wrapper's overhead) and against a plain torch Lloyd's k-means written the way a user would (random
init, chunked distance matrix), all three seeded at random; then ours with its default k-means++ seeding
(what `stvq quantize` runs); then nearest-codeword assignment throughput, faiss.knn against torch."""

import faiss
import numpy as np
import pytest
import torch

import stvq
from stvq_reference.codebook import nearest

K, N, DIM, NITER = 8192, 720_000, 16, 10


@pytest.fixture(scope="module")
def vectors() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2048, DIM, generator=g) * 2
    return (centres[torch.randint(2048, (N,), generator=g)] + 0.5 * torch.randn(N, DIM, generator=g)).contiguous()


def torch_kmeans(x: torch.Tensor, k: int, niter: int, chunk: int = 16384) -> torch.Tensor:
    """Lloyd's algorithm as a user writes it in torch: random initial centroids, argmin in chunks."""
    g = torch.Generator().manual_seed(0)
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(niter):
        ids = torch.cat([torch.cdist(c, centroids).argmin(1) for c in x.split(chunk)])
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def objective(x: torch.Tensor, centroids: torch.Tensor) -> float:
    ids = nearest(x, centroids)
    return (x - centroids[ids]).pow(2).sum(1).mean().item()


@pytest.mark.parametrize("impl", ["ours", "faiss", "torch", "ours k-means++"])
def test_kmeans_8192_on_720k(benchmark, vectors, impl):
    result = {}

    def run():
        if impl.startswith("ours"):
            init = "kmeans++" if impl.endswith("k-means++") else "random"
            q = stvq.create("quantizer", "kmeans", dim=DIM, codebook_size=K, niter=NITER, init=init)
            q.fit(vectors)
            result["centroids"] = q.codebook[0]
        elif impl == "faiss":
            km = faiss.Kmeans(DIM, K, niter=NITER, seed=0, max_points_per_centroid=256, init_method=faiss.ClusteringInitMethod_RANDOM)
            km.train(vectors.numpy())
            result["centroids"] = torch.from_numpy(km.centroids)
        else:
            result["centroids"] = torch_kmeans(vectors, K, NITER)

    benchmark.group = "k-means K=8192 720k x 16 cpu"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(impl=impl, mse=objective(vectors, result["centroids"]), vectors=N, k=K, niter=NITER)


@pytest.mark.parametrize("impl", ["faiss.knn", "torch cdist"])
def test_assignment_throughput(benchmark, vectors, impl):
    codebook = vectors[torch.randperm(N, generator=torch.Generator().manual_seed(1))[:K]].clone()
    queries = vectors[:200_000]
    if impl == "faiss.knn":
        fn = lambda: nearest(queries, codebook)  # noqa: E731
    else:
        fn = lambda: torch.cat([torch.cdist(c, codebook).argmin(1) for c in queries.split(16384)])  # noqa: E731
    benchmark.group = "assignment 200k x 16 to K=8192 cpu"
    benchmark.extra_info.update(impl=impl, vectors=len(queries))
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    assert np.array_equal(nearest(queries[:2000], codebook).numpy(), torch.cdist(queries[:2000], codebook).argmin(1).numpy())
