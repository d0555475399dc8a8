"""``stvq train``: a tokenizer's two stages on the shared loop (:class:`stvq.loop.BaseTrainer`). Stage 1
(:class:`ContinuousStage`): continuous codes with Gaussian noise, encoder and decoder together; stage 2
(:class:`QuantizedStage`): frozen encoder, quantized codes, decoder fine-tuned."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from stvq.config import TrainConfig
from stvq.data import first_images, is_stream, make_dataset
from stvq.errors import StvqError
from stvq.flops import count_flops
from stvq.images import save_image_grid
from stvq.interfaces import CodeTokenizer, FactorDataset
from stvq.loop import BaseTrainer
from stvq.losses import ImageObjective
from stvq.metrics import mean_image_psnr, psnr
from stvq.pretrained import load_pretrained
from stvq.registry import create, require_subclass
from stvq.run import RunDir, cache_key, checkpoint_step


class WithCodes(Dataset):
    """Items 0..M-1 of a data set with their cached codes: (image, codes)."""

    def __init__(self, dataset: Dataset, codes: torch.Tensor) -> None:
        self.dataset, self.codes = dataset, codes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[index], self.codes[index]


class Stage:
    """One training stage: what it builds, what stays frozen, and what the model's forward gets."""

    number: int

    def build(self, cfg: TrainConfig) -> CodeTokenizer:
        raise NotImplementedError

    def set_modes(self, model: CodeTokenizer) -> None:
        """After ``model.train()``: put the parts that do not train back into eval mode."""

    def forward_options(self, cfg: TrainConfig, step: int | None) -> dict[str, Any]:
        """Keyword arguments of :meth:`CodeTokenizer.forward` at a training ``step``; ``step=None``: at
        validation."""
        raise NotImplementedError

    def with_cached_codes(self, cfg: TrainConfig, model: CodeTokenizer, dataset: Dataset) -> tuple[Dataset, int | None]:
        """The data set to train on, and how many images come with cached codes (None: no cache)."""
        return dataset, None


class ContinuousStage(Stage):
    """Stage 1: a fresh ``cfg.tokenizer``, encoder and decoder trained on noisy continuous codes, with
    nested dropout (``tail_drop``) over the last part of the run."""

    number = 1

    def build(self, cfg: TrainConfig) -> CodeTokenizer:
        require_subclass("tokenizer", cfg.tokenizer, CodeTokenizer, "stvq train trains tokenizers with continuous codes (encoder, codes, decoder)")
        return _code_tokenizer(create("tokenizer", cfg.tokenizer, preset=cfg.preset, **cfg.model))

    def forward_options(self, cfg: TrainConfig, step: int | None) -> dict[str, Any]:
        if step is None:
            return {}
        return {"noise_sigma": cfg.noise_sigma, "tail_drop": cfg.tail_drop_at(step)}


class QuantizedStage(Stage):
    """Stage 2: the stage-1 run's model with its quantizer (or ``cfg.quantizer``); the encoder is frozen,
    the decoder learns the quantized codes, which come from the cache ``stvq quantize`` wrote where it can."""

    number = 2

    def build(self, cfg: TrainConfig) -> CodeTokenizer:
        source = Path(cfg.from_run or "")  # TrainConfig refuses stage 2 without --from
        if not (source / "config.json").is_file():
            raise StvqError(f"--from {source}: not a run directory (no config.json); pass a finished stage-1 run")
        model = _code_tokenizer(load_pretrained(source).train())
        if cfg.quantizer:
            model.set_quantizer(cfg.quantizer)
        elif model.quantizer is None:
            raise StvqError(f"run {cfg.from_run} has no codebook: run `stvq quantize --run {cfg.from_run} --k 8192` first, or pass --quantizer fsq or ema-vq")
        model.encoder.requires_grad_(False)
        return model

    def set_modes(self, model: CodeTokenizer) -> None:
        model.encoder.eval()

    def forward_options(self, cfg: TrainConfig, step: int | None) -> dict[str, Any]:
        return {"quantize": True}

    def with_cached_codes(self, cfg: TrainConfig, model: CodeTokenizer, dataset: Dataset) -> tuple[Dataset, int | None]:
        if not cfg.cache_codes or is_stream(dataset):  # a stream's images have no index to look codes up by
            return dataset, None
        key = cache_key(model.encoder, cfg.data, model.config.image_size, cfg.seed)
        cached = RunDir(cfg.from_run or "").load_codes(key, model.num_tokens, model.encoder.code_dim)
        return (dataset, None) if cached is None else (WithCodes(dataset, cached), len(cached))


STAGES: dict[int, Stage] = {1: ContinuousStage(), 2: QuantizedStage()}
VAL_IMAGES = 64  # validation images a run reconstructs at each evaluation


def _code_tokenizer(model: Any) -> CodeTokenizer:
    if not isinstance(model, CodeTokenizer):
        raise StvqError(f"tokenizer {type(model).__name__} cannot be trained by stvq train: it is not a CodeTokenizer (encoder, codes, decoder)")
    return model


def build_model(cfg: TrainConfig) -> CodeTokenizer:
    """The model stage ``cfg.stage`` trains (:class:`ContinuousStage`, :class:`QuantizedStage`)."""
    return STAGES[cfg.stage].build(cfg)


class Trainer(BaseTrainer[CodeTokenizer, TrainConfig]):
    """Trains a tokenizer, stage 1 or 2 (:class:`ContinuousStage`, :class:`QuantizedStage`)."""

    def __init__(self, cfg: TrainConfig, run: str | Path, resume: bool = False, progress: bool = True, console=None) -> None:
        super().__init__(cfg, run, resume, progress, console)
        self.stage = STAGES[cfg.stage]
        quantized = self.dir.path / RunDir.QUANTIZE
        if resume and quantized.is_file() and cfg.steps > (checkpoint_step(self.dir.checkpoint) or 0):
            raise StvqError(
                f"{self.dir} was quantized after its training ({quantized}); training it further would drop that codebook, fitted to the "
                f"encoder as it is: train stage 2 from it (--stage 2 --from {self.dir}), or delete {quantized} to extend it and quantize it again after"
            )

    def build(self) -> tuple[CodeTokenizer, Dataset, torch.Tensor]:
        cfg = self.cfg
        model = build_model(cfg).to(self.device)
        image_size = model.config.image_size
        self.objective, self.decoder = ImageObjective(cfg, image_size), model.decoder  # the decoder inside any DDP wrapper
        for companion in self.objective.companions().values():
            companion.to(self.device)
        dataset = make_dataset(cfg.data, image_size, "train", cfg.seed)
        val = make_dataset(cfg.data, image_size, "val", cfg.seed)
        self.reader = None
        if cfg.recognise:
            self.reader = val.recogniser() if isinstance(val, FactorDataset) else None
            if self.reader is None:
                raise StvqError(f"--train recognise=true reads the factors of the images back; --data {cfg.data} has no known factors and no recogniser (shapes has both)")
            self.val_factors = val.factor_table(VAL_IMAGES)
        return model, dataset, first_images(val, VAL_IMAGES).to(self.device)

    def prepare(self, model: CodeTokenizer, dataset: Dataset, val: torch.Tensor) -> tuple[Dataset, dict[str, Any]]:
        self.stage.set_modes(model)
        baseline = mean_image_psnr(dataset, val)
        dataset, cached = self.stage.with_cached_codes(self.cfg, model, dataset)
        self.cached = cached is not None
        return dataset, {
            "stage": self.cfg.stage,
            "val_psnr": None,
            "mean_image_psnr": baseline,
            "grid": str(self.dir.sample(self.cfg.steps)),
            "cached_codes": cached,
        }

    def compile(self, model: CodeTokenizer) -> None:
        model.encoder.compile()  # the parts, so that the decoder alone compiles where codes are cached
        model.decoder.compile()

    def companions(self) -> dict[str, torch.nn.Module]:
        return self.objective.companions()

    def split_refusal(self, model: CodeTokenizer) -> str | None:
        if self.companions():
            return "adversarial training: the discriminator's loss and the adaptive weight read the whole batch"
        if "generator" not in inspect.signature(model.forward).parameters:
            return f"{type(model).__name__}.forward takes no generator to draw its noise from"
        if self.stage.number == 2 and getattr(model.quantizer, "updates_in_forward", False):
            return f"the quantizer {type(model.quantizer).__name__} updates its codebook in each forward"
        return None

    def flops_per_item(self, model: CodeTokenizer) -> int:
        """Stage 1: encoder and decoder, forward and backward; stage 2: the decoder's, and the frozen
        encoder's forward unless the codes are cached (the quantizer's nearest-code search is not counted)."""
        images = torch.empty(1, 3, model.config.image_size, model.config.image_size)
        if self.cfg.stage == 1:
            return count_flops(model, images)
        decoder = count_flops(model.decoder, torch.empty(1, model.decoder.num_tokens, model.decoder.code_dim))
        return decoder if self.cached else decoder + count_flops(model.encoder, images, backward=False)

    def step(self, net, batch, step: int, generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        images, codes = (batch[0], batch[1].to(self.device)) if self.cached else (batch, None)
        images = images.to(self.device, non_blocking=True)
        options = self.stage.forward_options(self.cfg, step) | ({"generator": generator} if generator is not None else {})
        out = net(images, codes=codes, **options)
        losses, terms = self.objective(out.reconstruction, images, out.quantized, step, self.decoder, self.nets.get("discriminator"))
        record = {k: v.detach() for k, v in terms.items()}
        record["psnr"] = psnr(out.reconstruction.detach().clamp(-1, 1), images).mean()
        if out.quantized is not None:
            record.update({f"q_{k}": v for k, v in out.quantized.stats.items()})
        return losses, record, len(images)

    @torch.no_grad()
    def evaluate(self, model: CodeTokenizer, images: torch.Tensor, step: int) -> dict[str, float]:
        """Validation PSNR and MSE on ``images``, and the grid of the first eight (samples/)."""
        model.eval()
        options = self.stage.forward_options(self.cfg, None)
        recon = torch.cat([model(batch, **options).reconstruction.float() for batch in images.split(32)])
        model.train()
        self.stage.set_modes(model)
        if self.is_main:
            save_image_grid(self.dir.sample(step), torch.cat([images[:8], recon[:8]]).cpu(), per_row=len(images[:8]))  # originals above
        out = {"val_psnr": psnr(recon.clamp(-1, 1), images).mean().item(), "val_mse": F.mse_loss(recon, images).item()}
        if self.reader is not None:
            out.update({f"val_{k}": v for k, v in self.reader.reading_accuracy(recon.clamp(-1, 1), self.val_factors).items()})
        return out

    def status(self, record: dict[str, Any], last_eval: dict[str, float]) -> str:
        text = f"loss {record['loss']:.4f}  psnr {record['psnr']:.2f}  {record['images_per_s']:.0f} img/s"
        text += f"  val {last_eval['val_psnr']:.2f} dB" if last_eval else ""
        return text + (f"  shape read {last_eval['val_shape_accuracy']:.0%}" if "val_shape_accuracy" in last_eval else "")
