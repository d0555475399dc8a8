"""Weights on disk: ``config.json`` + ``model.safetensors`` in a directory, written atomically.

``config.json`` names the plugin (kind and name) and the options that rebuild it, so
:mod:`stvq.pretrained` can rebuild any registered plugin without importing it by name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from stvq.errors import CheckpointError, StvqError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


#: The mark of stvq's temporary directories: a writer stages new files in a fresh ``.stvq-tmp*/`` beside
#: their destination (the safetensors library's own temporary file lands there too) and renames them into
#: place; the next writer of a directory removes what a killed one left, and nothing else.
TMP_PREFIX = ".stvq-tmp"
#: Failures of the disk, not of the data: full, over quota, read-only, failing, or not stvq's to write.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def disk_error(err: BaseException, path: Path) -> StvqError | None:
    """One line for a write that the disk refused (an ``OSError``, or the safetensors library's error that
    carries one's message): which path, the free space there, and that nothing was changed. None for
    another error."""
    code = getattr(err, "errno", None)
    if code is None:
        code = next((c for c in DISK_ERRORS if os.strerror(c) in str(err)), None)
    if code not in DISK_ERRORS:
        return None
    try:
        free = f"{shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    fix = "free space or pass another directory" if code in (errno.ENOSPC, errno.EDQUOT) else "pass a directory stvq can write"
    return StvqError(f"cannot write {path}: {os.strerror(code)} ({free}); nothing there was changed: {fix}")


@contextmanager
def staged(directory: str | os.PathLike, what: Path | None = None) -> Iterator[Path]:
    """A fresh temporary directory inside ``directory`` for new files. When the block ends, every file
    written there is synced and renamed over its namesake in ``directory``; when it fails, none is and the
    directory holds what it held (a kill leaves the temporary directory, which the next writer removes).
    A disk that is full, read-only or failing is one line naming ``what`` (default: the directory)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory))
    except OSError as err:
        raise disk_error(err, directory) or err from None
    try:
        try:
            yield tmp
            names = sorted(os.listdir(tmp))
            for name in names:
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
        except Exception as err:
            problem = disk_error(err, what or directory)
            if problem is None:
                raise
            raise problem from None
        for name in names:
            os.replace(tmp / name, directory / name)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` then fsync and rename over ``path``: a crash leaves the old file or the new
    one, never a truncated one (:func:`staged`)."""
    path = Path(path)
    with staged(path.parent, what=path) as tmp:
        write(tmp / path.name)
    return path


LOCK_NAME = ".lock"
#: Folders of a run directory that another library writes and stvq never does (W&B's, whose logs link to
#: its own cache): their entry is checked, their insides are not.
FOREIGN = ("wandb",)


@contextmanager
def run_lock(directory: str | os.PathLike, tree: bool = True) -> Iterator[Path]:
    """One writer per directory: hold an OS lock on ``DIR/.lock`` (released by the kernel if the process
    dies, so a killed run never leaves a stale lock) and, as the only writer, remove the temporary
    directories (:data:`TMP_PREFIX`) that a killed writer left. A second writer gets one line.

    ``tree``: a run directory, whose writers also write into its folders and append to its files. Its whole
    tree is swept, and a symbolic link anywhere inside it that leads out of it is refused in one line: a run
    directory copied from elsewhere is data, and stvq never writes through a link out of it (a link within
    it, as W&B's ``wandb/latest-run``, is harmless). An output directory of files
    (``tree=False``) is swept at its top only; a link there is replaced by the new file, never written
    through (:func:`staged`)."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(directory / LOCK_NAME)
        lock.acquire(timeout=0)
    except Timeout:
        raise StvqError(f"{directory} is being written by another stvq process; wait for it to finish or pass another directory") from None
    except OSError as err:
        raise disk_error(err, directory) or err from None
    inside = directory.resolve()
    try:
        for root, dirs, files in os.walk(directory):  # links are listed, never followed
            for name in dirs + files if tree else ():
                if (Path(root) / name).is_symlink() and not (Path(root) / name).resolve().is_relative_to(inside):
                    raise StvqError(f"{Path(root) / name} is a symbolic link inside {directory}; stvq does not write through links: remove it or pass another directory")
            for name in [d for d in dirs if d.startswith(TMP_PREFIX) or (d in FOREIGN and Path(root) == directory)]:
                if name.startswith(TMP_PREFIX):
                    shutil.rmtree(Path(root) / name, ignore_errors=True)
                dirs.remove(name)
            if not tree:
                break
        yield directory
    finally:
        lock.release()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_npy(path: str | os.PathLike, array: Any) -> Path:
    """``array`` as a ``.npy`` file at exactly ``path`` (``np.save`` on a path appends ".npy"), atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def load_npy(path: str | os.PathLike) -> Any:
    """A ``.npy`` array, memory-mapped; a ``ValueError`` naming why for a file that is not a regular file (a
    FIFO would block), an ``.npz`` archive, a pickle (never loaded) or torn."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ValueError("missing, or not a regular file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # a header larger than the file is refused
    except (OSError, EOFError) as err:
        raise ValueError(str(err)) from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ValueError("an .npz archive, not one .npy array")
    return array


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}; pass a directory written by save_pretrained")
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); re-save it") from err


def json_type(value: Any) -> str:
    """JSON's name for the type of a decoded value: object, array, string, number, boolean or null."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


#: What stvq reads back from its own JSON files: at most this many bytes, integers of at most this many
#: digits (a 64-bit seed has 19), no NaN or Infinity, no key twice in an object.
JSON_MAX_BYTES, JSON_MAX_DIGITS = 64 * 2**20, 20


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number stvq writes")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > JSON_MAX_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-')):,} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} twice in one object")
    return dict(pairs)


def parse_json(text: str) -> Any:
    """``json.loads`` as stvq reads its files back: a ``ValueError`` for NaN or Infinity, an integer
    longer than :data:`JSON_MAX_DIGITS`, a key named twice in an object, or nesting too deep to read."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """The JSON object in a file stvq wrote (a config, manifest or summary), or one line naming the file
    and ``fix`` where it is torn (a kill mid-write by another tool), not JSON, larger than
    :data:`JSON_MAX_BYTES`, or not an object (:func:`parse_json`)."""
    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader
        raise StvqError(f"{path} is not a regular file; {fix}")
    if info.st_size > JSON_MAX_BYTES:
        raise StvqError(f"{path} holds {info.st_size:,} bytes, more than the {JSON_MAX_BYTES:,} of any JSON file stvq writes; {fix}")
    try:
        value = parse_json(path.read_bytes().decode())
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise StvqError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(value, dict):
        raise StvqError(f"{path} holds a JSON {json_type(value)}, not the object stvq writes; {fix}")
    return value


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}; pass a directory written by stvq")
    config = read_json(path, "re-save the model")
    for key, kind in (("kind", str), ("name", str), ("options", dict)):
        if key not in config:
            raise CheckpointError(f"{path} lacks the {key!r} entry; it was not written by stvq's save_pretrained")
        if not isinstance(config[key], kind):
            raise CheckpointError(f"{path}: {key!r} is a JSON {json_type(config[key])}, not {'an object of options' if kind is dict else 'a string'}; re-save the model")
    return config


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first mismatched tensors between a model's state dict
    (``expected``) and a checkpoint's (``found``)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}" for k in expected if k in found and found[k].shape != expected[k].shape]
    dtypes = [f"{k}: checkpoint {found[k].dtype} vs model {expected[k].dtype}" for k in expected if k in found and found[k].dtype != expected[k].dtype]
    broken = [k for k in expected if k in found and found[k].is_floating_point() and not torch.isfinite(found[k]).all()]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes), ("dtype mismatch", dtypes), ("NaN or infinite values", broken)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"weights in {source} do not match the config: {'; '.join(problems)}")


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)`` for an ``nn.Module`` registered as a plugin.

    Subclasses set ``plugin_kind`` and ``plugin_name`` and implement ``init_options()``: JSON-able keyword
    arguments that rebuild the module through ``stvq.create(kind, name, **options)``.
    """

    plugin_kind: str
    plugin_name: str

    def init_options(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        save_tensors(directory / WEIGHTS_NAME, cast(torch.nn.Module, self).state_dict(), metadata={"format": "pt"})
        config = {"kind": self.plugin_kind, "name": self.plugin_name, "stvq_version": metadata.version("stvq"), "options": self.init_options()}
        write_json(directory / CONFIG_NAME, config)
        return directory

    def load_weights(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / WEIGHTS_NAME
        state, module = load_tensors(path), cast(torch.nn.Module, self)
        check_state_dict(module.state_dict(), state, str(path))
        module.load_state_dict(state)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike):
        config = read_config(directory)
        model = cls(**config["options"])
        model.load_weights(directory)
        return cast(torch.nn.Module, model).eval()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes and bytes): the same weights, the same string."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
