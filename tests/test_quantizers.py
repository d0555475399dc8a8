"""Quantizers: the shared contract for every registered one, then what each method must do."""

import pytest
import torch

import stvq
from stvq.codebook_stats import codebook_stats
from stvq.testing import QuantizerContract
from stvq_reference.codebook import nearest

# (case id, registered name, options, fit before use) -- every registered quantizer appears at least once.
CASES = [
    ("fsq", "fsq", {"levels": [8, 5, 5, 4, 3, 3]}, False),
    ("fsq-projected", "fsq", {"levels": [8, 5, 5, 5], "dim": 6}, False),
    ("ema-vq", "ema-vq", {"codebook_size": 64}, False),
    ("ema-vq-l2-per-position", "ema-vq", {"codebook_size": 16, "positions": 36, "l2_normalize": True}, False),
    ("kmeans", "kmeans", {"codebook_size": 32}, True),
    ("kmeans-per-position-spherical", "kmeans", {"codebook_size": 8, "positions": 36, "spherical": True}, True),
]


def build(name, options, fit, dim):
    q = stvq.create("quantizer", name, **({"dim": dim} | options))
    if fit:
        q.fit(torch.randn(512, 36, dim, generator=torch.Generator().manual_seed(2)))
    return q


def test_every_registered_quantizer_is_under_contract():
    assert set(stvq.list_plugins()["quantizer"]) <= {name for _, name, _, _ in CASES}


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param


class TestQuantizerContract(QuantizerContract):
    @pytest.fixture(autouse=True)
    def _case(self, case):
        self.case = case

    def make_quantizer(self, dim):
        _, name, options, fit = self.case
        return build(name, options, fit, dim)

    def straight_through(self, quantizer, z):
        _, name, options, _ = self.case
        if name == "fsq":  # rounding is the identity to the gradient; the bound and projections are not
            return quantizer.project_out(quantizer.bound(quantizer.project_in(z.float())) / quantizer.half_width).to(z.dtype)
        if options.get("l2_normalize"):  # codes on the unit sphere, the gradient through the normalisation
            return torch.nn.functional.normalize(z, dim=-1)
        return z


def test_the_straight_through_contract_fails_a_quantizer_that_blocks_or_scales_the_gradient():
    """A wrong estimator fails the contract: here the expected map is off by a factor of two."""

    class Halved(TestQuantizerContract):
        def straight_through(self, quantizer, z):
            return 2 * z  # the identity is expected; a quantizer passing 2x would be caught the same way

    contract = Halved()
    contract.case = ("kmeans", "kmeans", {"codebook_size": 32}, True)
    z = torch.randn(4, 36, contract.dim, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        contract.test_gradient_passes_straight_through(contract.make_quantizer(contract.dim), z)


# ---------------------------------------------------------------------------------------------- FSQ


def test_fsq_codebook_sizes():
    assert stvq.create("quantizer", "fsq", levels=[8, 5, 5, 5]).codebook_size == 1000
    assert stvq.create("quantizer", "fsq", levels=[8, 8, 8, 5, 5, 5]).codebook_size == 64000


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [4, 4, 3], [7, 6, 2]])
def test_fsq_ids_and_codes_are_a_bijection_over_the_whole_codebook(levels):
    q = stvq.create("quantizer", "fsq", levels=levels)
    ids = torch.arange(q.codebook_size)
    grid = q.ids_to_grid(ids)
    assert torch.equal(q.grid_to_ids(grid), ids)
    assert len(torch.unique(grid, dim=0)) == q.codebook_size


@pytest.mark.parametrize("level", [2, 3, 4, 5, 8])
def test_fsq_codes_lie_on_the_grid_and_reach_every_level(level):
    q = stvq.create("quantizer", "fsq", levels=[level])
    z = torch.linspace(-6, 6, 2001).unsqueeze(-1)
    codes = q(z).codes[:, 0]
    half = level // 2
    integers = codes * half
    assert torch.equal(integers, integers.round())
    expected = list(range(-half, level - half))  # even L: -L/2 .. L/2-1; odd L: -(L-1)/2 .. (L-1)/2
    assert sorted(set(integers.long().tolist())) == expected


def test_fsq_gradient_is_that_of_the_bound():
    q = stvq.create("quantizer", "fsq", levels=[5, 5])
    z = torch.randn(10, 2, requires_grad=True)
    q(z).codes.sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (q.bound(z2) / q.half_width).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_fsq_projects_when_dim_differs():
    q = stvq.create("quantizer", "fsq", levels=[8, 5, 5, 5], dim=16)
    assert (q.project_in.in_features, q.project_in.out_features, q.project_out.out_features) == (16, 4, 16)
    assert q(torch.randn(3, 36, 16)).codes.shape == (3, 36, 16)


def test_fsq_rejects_bad_levels():
    with pytest.raises(stvq.ConfigError, match="levels must be integers >= 2"):
        stvq.create("quantizer", "fsq", levels=[8, 1])


# --------------------------------------------------------------------------------------- statistics


def test_codebook_stats_on_a_hand_made_case():
    stats = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert stats == {"usage": 0.5, "perplexity": pytest.approx(2.0), "dead_codes": 2}
    assert codebook_stats(torch.arange(8), 8)["perplexity"] == pytest.approx(8.0)
    assert codebook_stats(torch.zeros(9, dtype=torch.long), 8)["perplexity"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- EMA VQ

CENTRES = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [3.0, -3.0], [-3.0, -3.0]])


def mixture(n, std, seed):
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(4, (n,), generator=g)
    return CENTRES[which] + std * torch.randn(n, 2, generator=g)


def test_ema_vq_converges_to_the_mixture_centres():
    q = stvq.create("quantizer", "ema-vq", dim=2, codebook_size=4, decay=0.9)
    q(CENTRES + torch.tensor([0.8, -0.6]))  # first batch: one off-centre point per cluster
    for step in range(150):
        out = q(mixture(512, 0.5, step))
    assert torch.cdist(CENTRES, q.codebook[0]).min(dim=1).values.max() < 0.06
    assert out.stats["usage"] == 1.0 and out.stats["perplexity"] == pytest.approx(4, abs=0.1)


def test_ema_vq_restarts_a_dead_code_from_recent_outputs():
    q = stvq.create("quantizer", "ema-vq", dim=2, codebook_size=4, decay=0.8)
    q(CENTRES.clone())
    q.codebook[0, 2] = torch.tensor([100.0, 100.0])  # unreachable: never chosen again
    q.embed_sum[0, 2] = q.codebook[0, 2]
    restarts = 0
    for step in range(30):
        out = q(mixture(256, 0.3, step))
        restarts += out.stats["restarts"]
    assert restarts >= 1
    assert q.codebook[0, 2].abs().max() < 5  # back among the data
    assert out.stats["dead_codes"] == 0


def test_ema_vq_commitment_loss_pulls_codes_toward_codewords():
    q = stvq.create("quantizer", "ema-vq", dim=2, codebook_size=4, commitment=0.25)
    q(CENTRES.clone())
    q.eval()
    z = (CENTRES + 0.5).requires_grad_()
    out = q(z)
    assert out.loss.item() == pytest.approx(0.25 * 0.25)
    out.loss.backward()
    assert torch.all(z.grad > 0)  # descending the loss moves z back toward its codeword


# ------------------------------------------------------------------------------------------ k-means


def test_kmeans_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 8, generator=g) * 10
    data = centres.repeat(200, 1) + 0.1 * torch.randn(3200, 8, generator=g)
    q = stvq.create("quantizer", "kmeans", dim=8, codebook_size=16, niter=30)
    q.fit(data)
    assert torch.cdist(centres, q.codebook[0]).min(dim=1).values.max() < 0.1
    out = q.eval()(data)
    assert out.stats["mse"] == pytest.approx(0.01, rel=0.1)


def test_faiss_assignment_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    queries, codebook = torch.randn(5000, 16, generator=g), torch.randn(300, 16, generator=g)
    assert torch.equal(nearest(queries, codebook), torch.cdist(queries, codebook).argmin(-1))


def test_kmeans_per_position_codebooks_index_their_own_position():
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0.0, 100.0, -100.0]).view(1, 3, 1)
    data = torch.randn(600, 3, 4, generator=g) + offsets  # position p lives around offsets[p]
    q = stvq.create("quantizer", "kmeans", dim=4, codebook_size=8, positions=3)
    q.fit(data)
    assert q.codebook.shape == (3, 8, 4)
    assert torch.allclose(q.codebook.mean(dim=(1, 2)), offsets.view(3), atol=1.0)
    out = q(data)
    assert out.ids.shape == (600, 3) and out.ids.max() < 8
    for p in range(3):
        assert torch.equal(out.codes[:, p], q.codebook[p, out.ids[:, p]])


def test_kmeans_errors_name_the_fix():
    q = stvq.create("quantizer", "kmeans", dim=4, codebook_size=64)
    with pytest.raises(stvq.StvqError, match="codebook is empty.*stvq quantize"):
        q(torch.randn(2, 4))
    with pytest.raises(stvq.StvqError, match="K=64 needs at least K vectors per codebook, got 10"):
        q.fit(torch.randn(10, 4))
    with pytest.raises(stvq.StvqError, match="width 4 in the last axis"):
        q.fit(torch.randn(100, 5))
