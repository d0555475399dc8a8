"""Generation on the tokens: a prior (a registered :class:`stvq.interfaces.Prior`, ``gpt`` by default)
trained on the shards that ``stvq tokenize`` wrote, sampled (temperature, top-k, top-p; optionally
continuing the first N ids of real images) and measured by its held-out negative log-likelihood per
token position (``stvq prior train|sample|eval``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from stvq.checkpoint import load_npy, read_json, run_lock, save_npy, staged, weights_fingerprint, write_json
from stvq.config import PriorTrainConfig
from stvq.data import first_images, make_dataset
from stvq.distributed import device_of, in_batches
from stvq.errors import ConfigError, OptionRangeError, StvqError
from stvq.features import features
from stvq.flops import count_flops
from stvq.images import save_image_grid
from stvq.interfaces import FactorDataset, Prior, Recogniser, Tokenizer
from stvq.loop import BaseTrainer
from stvq.metrics import frechet_distance
from stvq.plots import plot_bits
from stvq.plugins import plugin_table
from stvq.pretrained import load_pretrained, load_tokenizer
from stvq.registry import create, require_subclass
from stvq.run import RunDir

# ------------------------------------------------------------------------------------------- shards


def check_shard_ids(path: Path, ids: np.ndarray, vocab_size: int) -> None:
    """Every id of a shard, once, where it is opened: integers in [0, vocab_size) (float ids would be
    truncated, and an id past the vocabulary trains silently until a batch draws it)."""
    if ids.dtype.kind not in "iu":
        raise StvqError(f"{path} holds {ids.dtype} values, not integer ids; write shards with stvq tokenize")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise StvqError(
            f"{path} holds ids in [{int(ids.min())}, {int(ids.max())}], outside the vocabulary [0, {vocab_size:,}) of its manifest; tokenize again with the tokenizer that the manifest names"
        )


class TokenShards(Dataset):
    """The ids of a ``stvq tokenize`` directory, one row (num_tokens,) int64 per image, read from the
    shards through memory maps (a data set larger than memory works). ``manifest`` is its manifest.json."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise StvqError(f"{self.dir} holds no manifest.json: pass a directory written by `stvq tokenize`")
        try:
            m = self.manifest = read_json(path, "run the same stvq tokenize again")
            self.num_images, self.num_tokens, self.vocab_size = int(m["num_images"]), int(m["num_tokens"]), int(m["vocab_size"])
            count = int(m["num_shards"])
            # Shards of a stream hold one piece each; older manifests name only the fixed shard_size.
            if not (0 <= self.num_images <= 2**40 and 1 <= self.num_tokens <= 2**16 and 1 <= self.vocab_size <= 2**31 and 0 <= count <= 10**7):
                raise ValueError(f"{self.num_images:,} images, {self.num_tokens:,} ids each over {self.vocab_size:,}, {count:,} shards: outside what stvq writes")
            rows = m.get("shard_rows") or [min(int(m["shard_size"]), self.num_images - i * int(m["shard_size"])) for i in range(count)]
            if len(rows) != count or sum(rows) != self.num_images:
                raise ValueError(f"its shards' rows ({len(rows):,} shards, {sum(rows):,} rows) do not add up to {count:,} shards of {self.num_images:,} images")
        except (ValueError, KeyError, TypeError) as err:
            raise StvqError(f"{path} is not a manifest that stvq tokenize wrote ({type(err).__name__}: {err})") from None
        self.starts = np.concatenate([[0], np.cumsum(rows)])
        self.shards = []
        for i in range(count):
            shard = self.dir / f"shard_{i:05d}.npy"
            try:
                ids = load_npy(shard)
            except ValueError as err:
                raise StvqError(f"{shard} is missing or unreadable ({err}): run the same stvq tokenize again to finish the shards") from None
            if ids.shape != (rows[i], self.num_tokens):
                raise StvqError(f"{shard} holds {ids.shape}, not ({rows[i]}, {self.num_tokens}): run the same stvq tokenize again")
            check_shard_ids(shard, ids, self.vocab_size)
            self.shards.append(ids)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> torch.Tensor:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        row = index - int(self.starts[shard])
        return torch.from_numpy(self.shards[shard][row].astype(np.int64))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Ids of images start..stop-1, (stop - start, num_tokens) int64."""
        return torch.stack([self[i] for i in range(start, stop)])

    def split(self, heldout: int) -> tuple[int, int]:
        """(training images, held-out images): the last ``heldout`` images, at most a tenth, are held out."""
        held = max(1, min(heldout, self.num_images // 10))
        if self.num_images - held < 1:
            raise StvqError(f"{self.dir} holds {self.num_images} image(s): too few to train a prior and hold some out")
        return self.num_images - held, held

    def allowed(self) -> torch.Tensor | None:
        """(num_tokens, vocab_size) bool: the ids each position may hold under the manifest's layout (a
        composed tokenizer's part owns its positions and id range; begin and separator ids their places);
        None where every id may go anywhere."""
        return layout_mask(self.manifest.get("layout"), self.num_tokens, self.vocab_size)

    def tokenizer(self, override: str | Path | None = None) -> Tokenizer:
        """The tokenizer that wrote these ids (or ``override``), checked against the manifest's sha256."""
        source = override or self.manifest.get("tokenizer")
        if not source:
            raise StvqError(f"{self.dir}/manifest.json does not say which tokenizer wrote it; pass --tokenizer DIR")
        if not Path(source).is_dir():
            raise StvqError(f"the tokenizer {source} that wrote {self.dir} is gone; pass --tokenizer DIR")
        tokenizer = load_tokenizer(source)
        if weights_fingerprint(tokenizer) != self.manifest.get("tokenizer_sha256"):
            raise StvqError(f"the tokenizer in {source} is not the one that wrote {self.dir} (its weights differ); pass the right --tokenizer DIR")
        return tokenizer


def layout_mask(layout: dict[str, Any] | None, num_tokens: int, vocab_size: int) -> torch.Tensor | None:
    """The ids each position may hold, from a :meth:`Tokenizer.manifest` layout; None for one part that
    covers every position with the whole vocabulary."""
    parts = (layout or {}).get("parts") or []
    if len(parts) <= 1 and not (layout or {}).get("begin_id") and not (layout or {}).get("separator_id"):
        return None
    mask = torch.zeros(num_tokens, vocab_size, dtype=torch.bool)
    covered = torch.zeros(num_tokens, dtype=torch.bool)
    for part in parts:
        first, last = part["positions"]
        mask[first:last, part["offset"] : part["offset"] + part["vocab_size"]] = True
        covered[first:last] = True
    assert layout is not None  # parts, or begin and separator ids: a layout was given
    for position in (~covered).nonzero().flatten().tolist():  # the special ids' places
        special = layout.get("begin_id") if position == 0 and layout.get("begin_id") is not None else layout.get("separator_id")
        mask[position, special] = True
    return mask


# ------------------------------------------------------------------------------------------ training


def next_id_loss(prior: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats per position (B, N) of ``ids`` under ``prior``."""
    logits = prior(ids)[:, :-1].float()  # row t predicts id t
    return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")


class PriorTrainer(BaseTrainer[Prior, PriorTrainConfig]):
    """Trains a prior on token shards; evaluates its held-out negative log-likelihood."""

    def build(self) -> tuple[Prior, Dataset, torch.Tensor]:
        cfg = self.cfg
        self.shards = TokenShards(cfg.shards)
        train_count, held = self.shards.split(cfg.heldout)
        require_subclass("prior", cfg.prior, Prior, "stvq prior trains autoregressive priors over ids")
        given = sorted({"vocab_size", "seq_len", "preset"} & set(cfg.model))
        if given:
            raise ConfigError(f"{', '.join(given)}: the shards decide the vocabulary ({self.shards.vocab_size:,}) and length ({self.shards.num_tokens}), --preset the size; drop --set {given[0]}")
        prior = create("prior", cfg.prior, vocab_size=self.shards.vocab_size, seq_len=self.shards.num_tokens, preset=cfg.preset, **cfg.model)
        heldout = self.shards.rows(train_count, train_count + held).to(self.device)
        return prior.to(self.device), Subset(self.shards, range(train_count)), heldout

    def prepare(self, prior: Prior, dataset: Any, val: torch.Tensor) -> tuple[Dataset, dict[str, Any]]:
        return dataset, {
            "shards": str(self.shards.dir),
            "vocab_size": self.shards.vocab_size,
            "num_tokens": self.shards.num_tokens,
            "train_images": len(dataset),
            "heldout_images": len(val),
            "parameters": sum(p.numel() for p in prior.parameters()),
        }

    def flops_per_item(self, prior: Prior) -> int:
        """Forward and backward over one image's ids."""
        return count_flops(prior, torch.zeros(1, self.shards.num_tokens, dtype=torch.long))

    def step(self, net, batch: torch.Tensor, step: int, generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        loss = next_id_loss(net, batch.to(self.device)).mean()
        return {"model": loss}, {"bits_per_token": loss.detach() / math.log(2)}, len(batch)

    def evaluate(self, prior: Prior, val: torch.Tensor, step: int) -> dict[str, float]:
        nll = heldout_nll(prior, val)
        return {"val_nll": float(np.mean(nll)), "val_bits_per_image": float(np.sum(nll) / math.log(2))}

    def status(self, record: dict[str, Any], last_eval: dict[str, float]) -> str:
        text = f"loss {record['loss']:.3f} nats  {record['images_per_s']:.0f} seq/s"
        return text + (f"  held-out {last_eval['val_bits_per_image']:.1f} bits/image" if last_eval else "")


@torch.no_grad()
def heldout_nll(prior: Prior, ids: torch.Tensor, batch_size: int = 256) -> list[float]:
    """Mean negative log-likelihood in nats at each token position over ``ids`` (M, N)."""
    was_training = prior.training
    prior.eval()
    total = torch.zeros(ids.shape[1], dtype=torch.float64)
    for batch in ids.split(batch_size):
        total += next_id_loss(prior, batch).double().sum(0).cpu()
    prior.train(was_training)
    return (total / len(ids)).tolist()


# ------------------------------------------------------------------------------------------ sampling


def pick(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """One id per row of ``logits`` (B, K): greedy at temperature 0 or top-k 1; otherwise a draw from the
    softmax at ``temperature``, kept to the ``top_k`` likeliest ids (0: all) and to the smallest set whose
    probability reaches ``top_p`` (nucleus sampling, Holtzman et al., 2020). ``allowed`` (K,) bool: the
    only ids that may be picked (a composed layout)."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of the likelier ids
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the likeliest id always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def sample(
    prior: Prior,
    n: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prefix: torch.Tensor | None = None,
    batch_size: int = 64,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` sequences of ``prior.seq_len`` ids (n, seq_len); ``prefix`` (n, k) fixes the first k ids of
    each; ``allowed`` (seq_len, K) bool keeps each position to its ids (:func:`layout_mask`). The same seed
    gives the same ids."""
    if n < 1:
        raise StvqError(f"-n must be at least 1, got {n}")
    prior.eval()
    device = device_of(prior)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        ids = prefix[start : start + count].to(device) if prefix is not None else torch.zeros(count, 0, dtype=torch.long, device=device)
        while ids.shape[1] < prior.seq_len:
            mask = None if allowed is None else allowed[ids.shape[1]]
            ids = torch.cat([ids, pick(prior(ids)[:, -1], temperature, top_k, top_p, generator, mask)[:, None]], 1)
        out.append(ids.cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------- a prior's run


def load_prior(run: str | Path) -> tuple[Prior, PriorTrainConfig]:
    """The prior of a ``stvq prior train`` run, and its config."""
    run_dir = RunDir(run)
    if not (run_dir.path / "config.json").is_file():
        raise StvqError(f"{run} holds no prior (no config.json): pass a directory written by `stvq prior train`")
    prior = load_pretrained(run_dir.path, kind="prior")
    if not isinstance(prior, Prior):
        raise StvqError(f"{run} holds a {type(prior).__name__}, not a prior: pass a directory written by `stvq prior train`")
    return prior, run_dir.read_train_config(PriorTrainConfig)


def evaluate_prior(run: str | Path, shards: str | Path | None = None, samples: int = 0, keeps: tuple[int, ...] = (), seed: int = 0) -> dict[str, Any]:
    """Held-out NLL per position (nats and bits) and bits per image of the prior in ``run``, on its own
    held-out images (or every image of ``shards``). With ``samples`` on shards of a data set with known
    factors and a recogniser (``shapes``): that many samples judged by its recogniser
    (:class:`stvq.interfaces.Recogniser`), and for each N in ``keeps`` the factors that
    survive when the first N ids of real images are kept. Writes prior_eval.json, prior_nll.png and
    samples.png (and keep_N.png) into the run."""
    prior, cfg = load_prior(run)
    if not 0 <= samples <= MAX_JUDGED:
        raise OptionRangeError(f"--samples must lie in [0, {MAX_JUDGED:,}] (every sample is decoded and held in memory), got {samples:,}")
    if any(not 0 <= keep <= prior.seq_len for keep in keeps):
        raise OptionRangeError(f"--keep must lie in [0, {prior.seq_len}] (the prior's sequence), got {max(keeps):,}")
    data = TokenShards(shards or cfg.shards)
    if (data.num_tokens, data.vocab_size) != (prior.seq_len, prior.vocab_size):
        raise StvqError(f"{data.dir} holds {data.num_tokens} ids per image over {data.vocab_size:,}; the prior models {prior.seq_len} over {prior.vocab_size:,}")
    ids = data.rows(data.split(cfg.heldout)[0] if shards is None else 0, data.num_images)
    bits = [v / math.log(2) for v in heldout_nll(prior, ids)]
    result: dict[str, Any] = {
        "prior": str(run),
        "shards": str(data.dir),
        "images": len(ids),
        "bits_per_position": bits,
        "bits_per_token": float(np.mean(bits)),
        "bits_per_image": float(np.sum(bits)),
        "uniform_bits_per_image": prior.seq_len * math.log2(prior.vocab_size),
    }
    if samples or keeps:
        result.update(judge_samples(prior, data, Path(run), samples, keeps, seed))
    write_json(Path(run) / "prior_eval.json", result)
    plot_bits({Path(run).name: bits}, Path(run) / "prior_nll.png")
    return result


def judged_data(data: TokenShards, image_size: int) -> tuple[Any, Recogniser]:
    """The validation images of the data set the shards were tokenized from, and its recogniser; refused
    in one line where that data set has no known factors or no recogniser."""
    fingerprint = str(data.manifest.get("data_fingerprint", ""))
    name = fingerprint.partition(":")[0]
    try:  # the fingerprint's first field names a registered data set: shapes:..., or folder:... without its location
        val = make_dataset(f"{name}:", image_size, "val") if name in plugin_table()["dataset"] else None
    except StvqError:
        val = None
    reader = val.recogniser() if isinstance(val, FactorDataset) else None
    if reader is None:
        raise StvqError(f"judging samples reads images of a data set with known factors and a recogniser (shapes has both); {data.dir} holds ids of {fingerprint or 'another data set'}")
    return val, reader


def judge_samples(prior: Prior, data: TokenShards, out: Path, samples: int, keeps: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Samples of ``prior`` decoded and read by the data's recogniser (clean share, per-factor total
    variation against real images, the EfficientNet-Lite0 Frechet distance); variations keeping the first
    N ids of real validation images, for each N in ``keeps``."""
    tokenizer = data.tokenizer()
    val, reader = judged_data(data, tokenizer.image_size)
    count = max(samples, 1)
    real = first_images(val, count)
    allowed = data.allowed()
    result: dict[str, Any] = {"recogniser": reader.accuracy}
    if samples:
        images = in_batches(tokenizer.decode, sample(prior, samples, seed=seed, allowed=allowed))
        save_image_grid(out / "samples.png", images[:64])
        read, truth = reader.read(images), reader.read(real)
        result["judge"] = {
            "samples": len(images),
            "clean_share": reader.clean_share(read),
            "clean_share_real": reader.clean_share(truth),
            "total_variation": reader.total_variation(read, truth),
            "fd_effnet_lite0": frechet_distance(features(images), features(real)),
        }
    sources = reader.read(real)
    real_ids = in_batches(tokenizer.encode, real)
    result["keep"] = {}
    for keep in keeps:
        variations = in_batches(tokenizer.decode, sample(prior, len(real), seed=seed, prefix=real_ids[:, :keep], allowed=allowed))
        save_image_grid(out / f"keep_{keep}.png", torch.cat([real[:8], variations[:8]]), per_row=8)  # sources above
        read = reader.read(variations)
        result["keep"][str(keep)] = {"survival": reader.survival(read, sources), "clean_share": reader.clean_share(read)}
    return result


#: Samples shown in samples.png (the first ones); ``stvq prior sample -n`` is bounded by MAX_SAMPLES, whose
#: ids (36 int64 each: 288 MB) are held in memory and written to ids.npy.
GRID_SAMPLES, MAX_SAMPLES = 64, 1_000_000
#: ``stvq prior eval --samples``: decoded images held in memory (50,000 is the count FID is computed on).
MAX_JUDGED = 50_000


def sample_run(
    run: str | Path,
    out: str | Path,
    n: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    keep: int = 0,
    source: str | None = None,
    tokenizer_dir: str | None = None,
) -> dict[str, Any]:
    """Sample the prior in ``run`` and decode through the tokenizer that wrote its shards: ``out`` gets
    ids.npy, samples.png and sample.json. ``keep`` N with ``source`` (a folder, 'shapes' or 'photos'):
    the first N ids of ``n`` real images are kept and the rest sampled (sources.png shows the images)."""
    if not 1 <= n <= MAX_SAMPLES:
        raise OptionRangeError(f"-n must lie in [1, {MAX_SAMPLES:,}], got {n:,}; sample more in several runs with other --seed values")
    prior, cfg = load_prior(run)
    shards = TokenShards(cfg.shards)
    tokenizer = shards.tokenizer(tokenizer_dir)
    if not 0 <= keep <= prior.seq_len:
        raise OptionRangeError(f"--keep must lie in [0, {prior.seq_len}], got {keep}")
    if keep and not source:
        raise StvqError("--keep N continues real images: give them with --from (a folder, shapes or photos)")
    prefix, sources = None, None
    if source:
        data = make_dataset(source, tokenizer.image_size, "val")
        if len(data) < n:
            raise StvqError(f"--from {source} holds {len(data)} image(s); -n {n} needs as many")
        sources = first_images(data, n)
        prefix = in_batches(tokenizer.encode, sources)[:, :keep]
    ids = sample(prior, n, temperature, top_k, top_p, seed, prefix, allowed=shards.allowed())
    images = in_batches(tokenizer.decode, ids[:GRID_SAMPLES])  # the grid's; every sample's ids go to ids.npy
    result = {"prior": str(run), "n": n, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, "keep": keep, "from": source}
    with run_lock(out, tree=False), staged(out) as tmp:  # one writer; the files replace the old ones together
        save_npy(tmp / "ids.npy", ids.numpy())
        save_image_grid(tmp / "samples.png", images)
        if sources is not None:
            save_image_grid(tmp / "sources.png", sources[:GRID_SAMPLES])
        write_json(tmp / "sample.json", result)
    return {**result, "images": images, "ids": ids, "sources": sources}
