"""``stvq compose``, ``encode``, ``decode`` and ``tokenize``: tokenizers joined, and images <-> ids."""

from __future__ import annotations

import click
from rich.table import Table

from stvq.cli.options import WritePath, console, distributed_tokenizer, given_meta, load_tokenizer_dir, workers_option
from stvq.config import parse_pairs
from stvq.errors import ConfigError

#: Where plugins' options of ``stvq compose`` (``register_options``)
#: put a part's source and options, e.g. the reference plugin's ``--vqgan`` and ``--vqgan-config``.
PARTS = "stvq.compose.parts"


@click.command()
@click.argument("spec")
@click.option("--part", "parts", multiple=True, metavar="NAME=PATH", help="A part's directory (or a file its plugin loads); repeatable.")
@click.option("--part-option", "part_options", multiple=True, metavar="NAME.KEY=VALUE", help="An option of a part's plugin, e.g. vqgan.config=model.yaml; repeatable.")
@click.option("--begin", is_flag=True, help="Start every sequence with a begin id.")
@click.option("--separator", is_flag=True, help="Put a separator id between the parts.")
@click.option("-o", "--output", required=True, type=WritePath(file_okay=False), help="Directory to write.")
def compose(spec, parts, part_options, begin, separator, output) -> None:
    """Join tokenizers into one sequence over one vocabulary (A+B[+C], e.g. styled+vqgan), and
    write a directory that `stvq.load_tokenizer` and --tokenizer accept. A single name converts that
    tokenizer (e.g. a taming .ckpt to safetensors).

    \b
    Example:
      stvq compose styled+vqgan --styled runs/NAME --vqgan model.ckpt --vqgan-config model.yaml -o tok/
      stvq compose vqgan --vqgan model.ckpt --vqgan-config model.yaml -o vqgan/
      stvq compose styled+titok --part styled=runs/NAME --part titok=runs/titok -o tok/
    """
    from stvq.checkpoint import run_lock, staged
    from stvq.compose import compose as do_compose

    sources: dict[str, dict] = {name: dict(given) for name, given in given_meta(PARTS).items()}
    for name, path in parse_pairs(parts, "--part", example="titok=runs/titok").items():
        sources.setdefault(name, {})["source"] = str(path)
    for key, value in parse_pairs(part_options, "--part-option", example="vqgan.config=model.yaml").items():
        name, dot, option = key.partition(".")
        if not (dot and name and option):
            raise ConfigError(f"--part-option {key}: not NAME.KEY=VALUE, e.g. --part-option vqgan.config=model.yaml")
        sources.setdefault(name, {})[option] = value
    options = {"begin": begin, "separator": separator} if "+" in spec else {}
    tokenizer = do_compose(spec, sources, **options)
    with run_lock(output, tree=False), staged(output) as tmp:  # one writer; the files replace the old ones together
        tokenizer.save_pretrained(tmp)
    table = Table(title=f"{spec} -> {output}")
    for column in ("part", "tokens", "vocabulary", "id range", "image size"):
        table.add_column(column, justify="right")
    for p in tokenizer.manifest()["parts"]:
        table.add_row(p["name"], str(p["num_tokens"]), f"{p['vocab_size']:,}", f"[{p['offset']:,}, {p['offset'] + p['vocab_size']:,})", str(p["image_size"]))
    table.add_row("[bold]total[/]", str(tokenizer.num_tokens), f"{tokenizer.vocab_size:,}", "", str(tokenizer.image_size))
    console.print(table)


tokenizer_option = click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(), help="A run or a composed tokenizer directory.")


@click.command()
@tokenizer_option
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=WritePath(dir_okay=False), help="A .npy file of ids (N, tokens).")
def encode(tokenizer_dir, images, output) -> None:
    """Images -> token ids, saved as a NumPy array (one row per image, in argument order).

    \b
    Example:
      stvq encode --tokenizer runs/NAME cat.jpg dog.png -o ids.npy
    """
    from stvq.checkpoint import save_npy
    from stvq.compose import read_images

    tokenizer = load_tokenizer_dir(tokenizer_dir)
    ids = tokenizer.encode(read_images(images, tokenizer.image_size)).cpu().numpy()
    save_npy(output, ids)  # at exactly the path named
    click.echo(f"{len(images)} image(s) -> {output}: ids {ids.shape}, vocabulary {tokenizer.vocab_size:,}")


@click.command()
@tokenizer_option
@click.argument("ids_file", type=click.Path())
@click.option("-o", "--output", required=True, type=WritePath(file_okay=False), help="Directory for the PNG files.")
def decode(tokenizer_dir, ids_file, output) -> None:
    """Token ids (.npy, one row per image) -> PNG images 000000.png, 000001.png, ...

    \b
    Example:
      stvq decode --tokenizer runs/NAME ids.npy -o decoded/
    """
    from stvq.compose import decode_to_pngs, read_ids

    tokenizer = load_tokenizer_dir(tokenizer_dir)
    ids = read_ids(ids_file, tokenizer.vocab_size)
    click.echo(f"{len(ids)} image(s) -> {decode_to_pngs(tokenizer, ids, output)}/")


@click.command()
@tokenizer_option
@click.option("--data", required=True, help="A folder of images, wds:SHARDS, hf:DIR[:split], or 'shapes' / 'photos' with --max-images.")
@click.option("-o", "--output", required=True, type=WritePath(file_okay=False), help="Directory for shards and manifest.json.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True, help="Images per .npy shard.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-images", type=click.IntRange(min=1), help="Tokenize only the first N images.")
@workers_option
def tokenize(tokenizer_dir, data, output, shard_size, batch_size, max_images, num_workers) -> None:
    """A whole data set -> sharded token files (shard_NNNNN.npy + manifest.json with the vocabulary and
    layout), for an autoregressive model's data loader. Re-running resumes: finished shards are kept.

    \b
    Example:
      stvq tokenize --tokenizer tok/ --data images/ -o shards/
      torchrun --nproc_per_node 8 $(which stvq) tokenize --tokenizer tok/ --data 'wds:train-{000000..001023}.tar' -o shards/

    Under torchrun each process encodes its own shards; the ids are the same for any number of processes.
    A wds: source gives one shard per tar file, with its samples' keys beside it (shard_NNNNN.keys.json).
    """
    from stvq.compose import tokenize_dataset
    from stvq.data import tokenize_source
    from stvq.distributed import is_main

    tokenizer = distributed_tokenizer(tokenizer_dir)
    dataset, fingerprint = tokenize_source(data, tokenizer.image_size, max_images)
    result = tokenize_dataset(
        tokenizer,
        dataset,
        output,
        shard_size=shard_size,
        batch_size=batch_size,
        console=console,
        data_fingerprint=fingerprint,
        tokenizer_dir=tokenizer_dir,
        num_workers=num_workers,
    )
    if is_main():
        unreadable = f", {result['unreadable']} unreadable member(s) skipped" if result.get("unreadable") else ""
        click.echo(
            f"{result['num_images']:,} images -> {result['num_shards']} shard(s) in {output} ({result['skipped_shards']} already there), {result['num_tokens']} tokens each, vocabulary {result['vocab_size']:,}{unreadable}"
        )
