"""Data sources for data sets at scale: webdataset tar shards (``--data wds:PATTERN``, streamed) and
Hugging Face datasets on disk (``--data hf:PATH[:split]``, indexed). Both read images the way an image
folder does (:func:`stvq.images.load_image`: EXIF orientation, RGB, shorter side resized, centre crop)."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from stvq.errors import StvqError
from stvq.images import IMAGE_SUFFIXES, codec_message, load_image
from stvq.interfaces import ImageDataset, ImageStream

#: Images of a ``wds:`` source's validation split: the first members of its last shard.
VAL_IMAGES = 512
#: The largest tar member read into memory: an image is a few megabytes, and a 2 MB ``.tar.gz`` can hold a
#: member of gigabytes. A larger one is skipped with a warning (as the image decoder bounds pixels).
MAX_MEMBER_BYTES = 256 * 2**20
IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in sorted(IMAGE_SUFFIXES))


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise StvqError("--data wds:... reads tar shards with the webdataset package: pip install 'stvq[data]'") from None
    return webdataset


class WebDatasetSource(ImageStream):
    """Tar shards in the webdataset layout (members ``KEY.jpg``, ``KEY.png``, ... grouped by key), named
    by a brace pattern such as ``train-{000000..000099}.tar``, read in order without an index. Splits:
    ``all`` every shard; ``train`` every shard but the last (all of them if there is one); ``val`` the
    first :data:`VAL_IMAGES` images of the last shard, as a small indexed data set. A member that cannot
    be decoded is skipped with a warning and counted by the reader, like a corrupt file in a folder."""

    def __init__(self, location: str, image_size: int, split: str = "train", seed: int = 0) -> None:
        wds = _webdataset()
        urls = list(wds.shardlists.expand_urls(location))
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not Path(u).is_file()]
        if not urls or missing:
            raise StvqError(f"wds:{location}: no shard file {missing[0] if missing else location}; give a brace pattern of existing tar files, e.g. wds:data/train-{{000000..000009}}.tar")
        if split not in ("train", "val", "all"):
            raise StvqError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
        self.urls, self.image_size, self.split, self.location = urls, image_size, split, location
        self._pieces = urls[:-1] if split == "train" and len(urls) > 1 else urls

    def pieces(self) -> list[str]:
        return list(self._pieces)

    def fingerprint(self) -> str:
        """The shard names with their sizes (local files): another pattern or a rewritten shard changes it."""
        import hashlib

        listing = [f"{u}\t{os.path.getsize(u) if os.path.isfile(u) else ''}" for u in self._pieces]
        return hashlib.sha256("\n".join(listing).encode()).hexdigest()

    def samples(self, piece: str) -> Iterator[dict]:
        """The raw samples of one shard ({"__key__": ..., "jpg": bytes, ...}), grouped by webdataset; a
        damaged tar is warned about and read as far as it goes."""
        wds = _webdataset()
        return wds.tariterators.group_by_keys(_members(piece), handler=wds.warn_and_continue)

    def read(self, piece: str, skip: int = 0) -> Iterator[tuple[int, str, torch.Tensor | None]]:
        """(index, key, image) of each sample of ``piece`` from ``skip`` on; an unreadable member's image is
        None. The first of a shard's unreadable members is warned about, naming why; the rest are counted
        by the reader without a line each."""
        warned = False
        for index, sample in enumerate(self.samples(piece)):
            if index < skip:
                continue
            image, why = self._decode(sample)
            if why is not None and not warned:
                warned = True
                warnings.warn(f"skipped unreadable member {sample['__key__']} of {piece} ({why}); the shard's other unreadable members are skipped and counted", stacklevel=2)
            yield index, sample["__key__"], image

    def _decode(self, sample: dict) -> tuple[torch.Tensor | None, str | None]:
        """(the image, None), or (None, why it cannot be read)."""
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            return None, f"no image member ({', '.join(IMAGE_EXTENSIONS)})"
        try:
            return load_image(io.BytesIO(sample[ext]), self.image_size), None
        except Exception as err:  # PIL and the codecs raise many types
            return None, codec_message(err)

    def validation(self) -> ImageList:
        """The first :data:`VAL_IMAGES` readable images of the last shard; a shard with none is one error
        that says why its first member could not be read."""
        images: list[torch.Tensor] = []
        first = None
        for sample in self.samples(self.urls[-1]):
            image, why = self._decode(sample)
            if image is not None:
                images.append(image)
            elif first is None:
                first = f"{sample['__key__']}: {why}"
            if len(images) == VAL_IMAGES:
                break
        if not images:
            raise StvqError(
                f"{self.urls[-1]}, the last shard of wds:{self.location}, holds no readable image{f' (its first member, {first})' if first else ''}; validation reads its first {VAL_IMAGES} images: end the pattern at a shard that holds images"
            )
        if first:
            warnings.warn(f"validation skipped the unreadable members of {self.urls[-1]} (the first, {first})", stacklevel=2)
        return ImageList(images, f"the first {len(images)} images of {self.urls[-1]}")


def _members(url: str) -> Iterator[dict]:
    """The regular members of one shard as webdataset's {"fname", "data", "__url__"}, streamed by
    ``tarfile``; a member over :data:`MAX_MEMBER_BYTES` is passed over unread (the stream reads through it
    block by block), one that is not a tar is one warning."""
    import tarfile

    wds = _webdataset()
    try:
        with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg() or info.name.startswith("__"):
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    warnings.warn(f"skipped member {info.name!r} of {url}: {info.size:,} bytes, over the {MAX_MEMBER_BYTES:,} an image may hold", stacklevel=2)
                    continue
                member = tar.extractfile(info)
                assert member is not None  # a regular member has its bytes
                yield {"fname": info.name, "data": member.read(), "__url__": url}
                tar.members = []  # type: ignore[attr-defined]  # a stream holds no index: keep memory flat over a long shard
    except (tarfile.TarError, OSError, EOFError) as err:
        warnings.warn(f"{url} is not a readable tar file past this point ({type(err).__name__}: {err}); read what came before", stacklevel=2)


def webdataset(location: str, image_size: int, split: str = "train", seed: int = 0):
    """The ``wds`` factory: a :class:`WebDatasetSource` stream, or for ``split="val"`` its small indexed
    validation images."""
    if split == "val":
        return WebDatasetSource(location, image_size, "all", seed).validation()
    return WebDatasetSource(location, image_size, split, seed)


class ImageList(ImageDataset):
    """Images already decoded, as a data set; ``source`` names where they came from."""

    def __init__(self, images: list[torch.Tensor], source: str) -> None:
        if not images:
            raise StvqError(f"no image in {source}")
        self.images, self.source = images, source

    def fingerprint(self) -> str:
        return self.source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def _split_location(location: str) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH:split`` (a split name holds no path separator)."""
    path, sep, split = location.rpartition(":")
    if sep and path and "/" not in split and not Path(location).exists():
        return Path(path), split
    return Path(location), None


class HFImageDataset(ImageDataset):
    """A Hugging Face dataset on disk: a directory written by ``save_to_disk`` (a Dataset or a DatasetDict),
    a directory of parquet files, or an ``imagefolder`` directory; offline (no hub access is attempted).
    The images are the first column of the ``Image`` feature type. ``hf:PATH:split`` picks the split of a
    DatasetDict (default ``train``); ``val`` is its ``validation`` (or ``val``, ``test``) split where there is
    one, else every 20th row, which ``train`` then leaves out (as for a folder); ``all`` is every row."""

    VAL_NAMES = ("validation", "val", "test")

    def __init__(self, location: str, image_size: int, split: str = "train", seed: int = 0) -> None:
        path, named = _split_location(location)
        if not path.exists():
            raise StvqError(f"hf:{location}: {path} does not exist; give a directory written by Dataset.save_to_disk, or of parquet files or images")
        splits = _load_hf(path)
        if named is not None and named not in splits:
            raise StvqError(f"hf:{location}: no split {named!r}; it has {', '.join(splits)}")
        main = named or ("train" if "train" in splits else next(iter(splits)))
        table = splits[main]
        val_name = next((n for n in self.VAL_NAMES if n in splits and n != main), None) if named is None else None
        rows: Sequence[int] = range(len(table))
        if split == "val":
            table, rows = (splits[val_name], range(len(splits[val_name]))) if val_name else (table, rows[::20])
        elif split == "train" and val_name is None and len(table) > 1:
            rows = [i for i in rows if i % 20]
        elif split not in ("train", "all"):
            raise StvqError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
        from datasets import Image as ImageFeature

        column = next((name for name, feature in table.features.items() if isinstance(feature, ImageFeature)), None)
        if column is None:
            raise StvqError(f"hf:{location}: no column of the Image feature type (columns: {', '.join(table.features)})")
        # datasets' Image feature would decode with every PIL format (EPS runs Ghostscript): read the encoded
        # image and decode it as a folder's file is (stvq.images.IMAGE_FORMATS)
        self.table_fingerprint = table._fingerprint
        table = table.cast_column(column, ImageFeature(decode=False))
        self.table, self.rows, self.column, self.image_size = table, list(rows), column, image_size
        self.location, self.split = location, split
        self.broken: list[int] = []  # rows that failed to decode

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        return f"hf:{self.table_fingerprint}:{len(self.rows)}"

    def __getitem__(self, index: int) -> torch.Tensor:
        """The image of row ``index``; one that fails to decode is skipped with one warning and counted
        (``broken``), and the next row stands in, as for a folder's files."""
        skipped = []
        for offset in range(len(self.rows)):
            row = self.rows[(index + offset) % len(self.rows)]
            try:
                encoded = self.table[row][self.column]  # {"bytes": ..., "path": ...}
                image = load_image(io.BytesIO(encoded["bytes"]) if encoded["bytes"] is not None else encoded["path"], self.image_size)
            except Exception as err:  # PIL and the codecs raise many types
                if self.split == "all":  # a row per image: a stand-in would give this row another's ids
                    raise StvqError(
                        f"cannot decode the image in row {row} of hf:{self.location} ({codec_message(err)}): fix or drop the row and run the same command again (finished shards are kept)"
                    ) from None
                if row not in self.broken:
                    self.broken.append(row)
                    skipped.append((row, codec_message(err)))
                continue
            for row, why in skipped:  # warned once a stand-in is found: a data set with none is one error below
                warnings.warn(f"skipped undecodable image in row {row} of hf:{self.location} ({why}); the next row stands in", stacklevel=2)
            return image
        first = f" (row {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise StvqError(f"none of the {len(self.rows)} {self.split} row(s) of hf:{self.location} decodes{first}")


def _load_hf(path: Path) -> dict:
    """{split name: datasets.Dataset} of a directory, with the hub switched off for the call (the
    environment variables the hub libraries read at import, and datasets' own switch after it)."""
    saved = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(dict.fromkeys(saved, "1"))
    try:
        import datasets
    except ImportError:
        raise StvqError("--data hf:... reads Hugging Face datasets with the datasets package: pip install 'stvq[data]'") from None
    online, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True
    datasets.disable_progress_bars()
    # Its log lines (errors included: a damaged parquet file is logged, then raised) would come before our
    # one line, which carries the error's own message.
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL + 1)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif any(path.rglob("*.parquet")):
            loaded = datasets.load_dataset("parquet", data_dir=str(path))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as err:  # datasets raises its own types for foreign or damaged directories
        raise StvqError(f"hf:{path}: cannot load it as a Hugging Face dataset ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = online
        datasets.utils.logging.set_verbosity(verbosity)
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
