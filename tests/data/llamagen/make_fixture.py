"""Writes this folder's LlamaGen fixture with LlamaGen's own code: ``python make_fixture.py LLAMAGEN_DIR``
(a checkout of FoundationVision/LlamaGen; its ``tokenizer/tokenizer_image/vq_model.py`` is imported as it
is). It writes

- ``keys.json``: every state-dict key of LlamaGen's ``VQ-16`` and ``VQ-8`` at their defaults, with its shape;
- ``small_ema.pt``: a small model of the same layout (base width 32 instead of 128, ``encoder_ch_mult`` and
  ``decoder_ch_mult`` [1, 1], ``z_channels`` 32, 64 codes of 8 dimensions), its usage buffer filled by two
  training-mode forwards as LlamaGen's training fills it, saved as LlamaGen's training script saves
  checkpoints (``{"ema": ..., "steps": ..., "args": ...}``);
- ``small_reference.safetensors``: three 32-px images, the ids LlamaGen's ``encode`` picks for them and the
  images its ``decode_code`` draws from those ids.

The base width is not a ``ModelArgs`` field (LlamaGen fixes it at 128), so the script sets the default of its
``Encoder`` and ``Decoder``; nothing else of LlamaGen is changed."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).parent
SMALL = {"encoder_ch_mult": [1, 1], "decoder_ch_mult": [1, 1], "z_channels": 32, "codebook_size": 64, "codebook_embed_dim": 8}


def main(llamagen: str) -> None:
    sys.path.insert(0, llamagen)
    from tokenizer.tokenizer_image import vq_model

    keys = {name: {k: list(v.shape) for k, v in build().state_dict().items()} for name, build in vq_model.VQ_models.items()}
    (HERE / "keys.json").write_text(json.dumps(keys, indent=0) + "\n")

    for cls in (vq_model.Encoder, vq_model.Decoder):  # base width 32: the second default of both
        defaults = list(cls.__init__.__defaults__)
        defaults[1] = 32
        cls.__init__.__defaults__ = tuple(defaults)
    torch.manual_seed(0)
    model = vq_model.VQModel(vq_model.ModelArgs(**SMALL))
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(F.normalize(torch.randn(64, 8), dim=-1))
        model.train()
        for _ in range(2):
            model(torch.rand(8, 3, 32, 32) * 2 - 1)  # fills codebook_used as training does
        model.eval()
        images = torch.rand(3, 3, 32, 32) * 2 - 1
        quant, _, (_, _, indices) = model.encode(images)
        ids = indices.reshape(len(images), -1)
        recon = model.decode_code(ids.flatten(), quant.shape)
    torch.save({"ema": model.state_dict(), "steps": 1000, "args": {"vq_model": "VQ-16", **SMALL}}, HERE / "small_ema.pt")
    save_file({"images": images.contiguous(), "ids": ids.contiguous(), "reconstructions": recon.contiguous()}, HERE / "small_reference.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
