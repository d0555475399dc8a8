"""The optimizers a training loop uses: :func:`make_optimizer` (AdamW, or Muon beside AdamW as one
optimizer, ``--train optimizer=muon``), the schedule's rate (:func:`set_lr`) and the update (:func:`update`).

torch.optim.Muon (Jordan et al., 2024; the RMS-matched rate of Liu et al., 2025, "Muon is scalable for LLM
training") orthogonalises each matrix's momentum with Newton-Schulz iterations, one small matrix at a
time; a transformer's blocks hold many matrices of a few shapes, so the step here runs the iterations
of every same-shaped matrix as one batched product (the same arithmetic, to the bit, as a test checks).

torch runs the iterations in bfloat16, which a GPU (and a CPU with AVX-512 BF16 or AMX) multiplies at
speed; a CPU with AVX2 alone emulates it about 20x slower than float32 (a `tiny` step's iterations: 940
ms against 45 ms on one AMD EPYC thread), so off CUDA they run in float32: more exact, not torch's bits.
There a matrix more than twice as long as it is wide iterates on its Gram matrix (``newton_schulz(gram=True)``:
the same function, fewer products; a `tiny` step's iterations 1.4x faster).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch.optim._muon import _adjust_lr  # the rate adjustment torch.optim.Muon applies, kept identical

from stvq.config import LoopConfig


def newton_schulz(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype = torch.bfloat16, gram: bool = False) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation over a batch (B, m, n), in ``dtype``
    (torch's: bfloat16).

    Each iteration is x <- q(A) x with A = x x^T (m x m, m <= n) and q(A) = a I + b A + c A^2. ``gram``
    iterates on A alone: every q(A) is a polynomial in the first A, so they commute, A <- q A q and the
    product P of the q's are m x m, and x is multiplied once at the end (P x). The same function in exact
    arithmetic, at 4 m^3 multiply-adds an iteration in place of 2 m^2 n + m^3, plus 2 m^2 n once: at five
    iterations cheaper from about n = 2 m on (a transformer's MLP matrices, n = 4 m; an un-patchify, n = 64 m).
    For float32: in bfloat16 the squared condition of A loses the small singular values."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if gram:
        A = x @ x.mT  # (B, m, m)
        eye = torch.eye(A.size(-1), dtype=dtype, device=A.device)
        P = None
        for _ in range(steps):
            q = torch.baddbmm(A, A, A, beta=b, alpha=c).add_(eye, alpha=a)
            P = q if P is None else q @ P
            A = q @ A @ q
        x = P @ x
    else:
        for _ in range(steps):
            A = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(A, A, A, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the groups marked ``muon``, AdamW on the others: one optimizer to the loop (its
    ``param_groups`` are both's, its state one dict, so checkpoints, ``set_lr`` and clipping see one).
    ``ns_dtype`` is the Newton-Schulz iterations' precision; None: bfloat16 on CUDA, float32 elsewhere."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], fused: bool | None, ns_dtype: torch.dtype | None = None) -> None:
        self.ns_dtype = ns_dtype
        muon = [g for g in groups if g["muon"]]
        adamw = [g for g in groups if not g["muon"]]
        # torch.optim.Muon checks for 2-D weights; a convolution's weight (out, in, k, k) is orthogonalised as
        # the matrix (out, in k k) of its linear map, as Jordan's Muon does: so it is built on those views,
        # and _link hands it the groups themselves
        flat = [{**g, "params": [p.detach().view(len(p), -1) for p in g["params"]]} for g in muon]
        self._muon = torch.optim.Muon(flat, lr=lr, adjust_lr_fn="match_rms_adamw") if muon else None
        for g in muon:
            g.update({k: v for k, v in self._muon.defaults.items() if k not in g})  # type: ignore[union-attr]  # muon: _muon is built
        self._adamw = torch.optim.AdamW(adamw, lr=lr, betas=betas, fused=fused) if adamw else None
        super().__init__(muon + adamw, {})  # the same group dicts, each optimizer's defaults filled in
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (load_state_dict replaces both)."""
        for opt, muon in ((self._muon, True), (self._adamw, False)):
            if opt is not None:
                opt.param_groups = [g for g in self.param_groups if g["muon"] is muon]
                opt.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure: the loop computes the loss
        if self._muon is not None:
            self._muon_step()
        if self._adamw is not None:
            self._adamw.step()

    def _muon_step(self) -> None:
        """torch.optim.Muon's step (Nesterov momentum, Newton-Schulz, decoupled weight decay, the adjusted
        rate), with same-shaped matrices batched."""
        assert self._muon is not None
        for group in self._muon.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._muon._init_group(group, params, grads, bufs)
            if not params:
                continue
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
            shapes: dict[torch.Size, list[int]] = {}
            for i, p in enumerate(params):
                shapes.setdefault(p.shape, []).append(i)
            lr = group["lr"]
            dtype = self.ns_dtype or (torch.bfloat16 if params[0].is_cuda else torch.float32)
            for shape, index in shapes.items():
                matrix = torch.Size((shape[0], shape[1:].numel()))
                stacked = torch.stack([updates[i].reshape(matrix) for i in index])
                gram = dtype == torch.float32 and max(matrix) > 2 * min(matrix)  # where it is cheaper (docs/experiments/throughput.md)
                ortho = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype, gram)
                same = [params[i] for i in index]
                torch._foreach_mul_(same, 1 - lr * group["weight_decay"])
                torch._foreach_add_(same, list(ortho.float().view(-1, *shape).unbind(0)), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], matrix))


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW, or with ``cfg.optimizer == "muon"`` Muon on the hidden matrices and convolution weights
    named by ``cfg.muon_params`` ("*": all of them; never an embedding table or the decoder's last layer,
    which writes the pixels) and AdamW on the rest (:class:`stvq.optim.MuonAdamW`); no weight decay on
    biases, norms and learned tokens (1-D or 3-D embeddings); a parameter whose name contains a key of
    ``cfg.lr_scales`` learns at that multiple of the learning rate. ``weight_decay`` replaces
    ``cfg.weight_decay`` (a discriminator trains without)."""
    decay = cfg.weight_decay if weight_decay is None else weight_decay
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = {}
    last_layer = getattr(model, "last_layer", None)  # a model that writes pixels says which layer (CodeTokenizer.last_layer)
    output = last_layer() if callable(last_layer) else None
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in cfg.lr_scales.items() if k in name), 1.0)
            weight = p.ndim in (2, 4)  # a matrix or a convolution: not a bias, norm or learned token
            named = any(k == "*" or k in name for k in cfg.muon_params)
            muon = cfg.optimizer == "muon" and weight and named and p is not output and id(p) not in tables
            groups.setdefault((scale, decay if weight else 0.0, muon), []).append(p)
    params = [{"params": ps, "weight_decay": decay, "lr_scale": scale, "muon": muon} for (scale, decay, muon), ps in groups.items()]
    fused = cfg.fused_optimizer or None
    if cfg.optimizer == "muon":
        return MuonAdamW(params, cfg.lr, (0.9, cfg.beta2), fused)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=fused)


def make_optimizers(parts: dict[str, torch.nn.Module], cfg: LoopConfig) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per trained part: the model's (:func:`make_optimizer`), and for each companion (a
    discriminator) AdamW at the same rate, without weight decay, with no ``lr_scales``."""
    companion = replace(cfg, lr_scales={}, optimizer="adamw")
    return {name: make_optimizer(m, cfg) if name == "model" else make_optimizer(m, companion, weight_decay=0.0) for name, m in parts.items()}


def update(opts: dict[str, torch.optim.Optimizer], losses: dict[str, torch.Tensor], grad_clip: float) -> None:
    """One step of each part that has a loss this step, in order (the model before its discriminator, whose
    loss reads detached reconstructions): backward, clip the gradient norm (0: no clipping), step."""
    for name, loss in losses.items():
        opt = opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(opt, grad_clip)


def clip_and_step(opt: torch.optim.Optimizer, grad_clip: float) -> None:
    """Clip the gradient norm of ``opt``'s parameters (0: no clipping), then step."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()


def set_lr(opt: torch.optim.Optimizer, lr: float, scales_weight: float = 1.0) -> None:
    """The schedule's learning rate, times each group's ``lr_scale`` (moved towards 1 as
    ``scales_weight`` goes from 1 to 0)."""
    for group in opt.param_groups:
        scale = group.get("lr_scale", 1.0)  # checkpoints of earlier versions have none
        group["lr"] = lr * (1.0 + (scale - 1.0) * scales_weight)
