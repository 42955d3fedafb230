"""Reading and writing the weight files of a Hugging Face model folder, safetensors only.

    tensors, sources = read_weights(folder)        # {name: Tensor}, {name: file it came from}
    write_weights(tmp_folder, tensors, max_shard_bytes=2**30)
    with atomic_folder(path) as tmp: ...           # fill tmp; it replaces ``path`` only on success

A folder holds ``model.safetensors``, or shards listed in ``model.safetensors.index.json``.
Pickle files (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused and never opened:
unpickling runs arbitrary code. Every error is a :class:`~bitnet158.errors.CheckpointError` naming
the file (and tensor) at fault. Used by :mod:`bitnet158.checkpoint`; no model knowledge here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_ADVICE = ("pickle files are never loaded (unpickling can run arbitrary code); convert the "
                 "weights to safetensors with a tool you trust (e.g. safetensors.torch.save_file in "
                 "an isolated environment) and pass that folder")


def refuse_pickle(path: Path) -> None:
    """Raise if ``path`` is a pickle-format weight file (by suffix; the file is never opened)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: refused: {PICKLE_ADVICE}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights of ``folder``, in a stable order.

    ``model.safetensors.index.json`` wins when present; then ``model.safetensors``; then every
    ``*.safetensors`` file. A folder with only pickle weights is refused.
    """
    index = folder / INDEX
    if index.is_file():
        weight_map = read_index(index)
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (folder / f).is_file():
                raise CheckpointError(f"{index}: lists shard {f!r}, which is missing from {folder}")
        return [folder / f for f in files]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights found ({', '.join(pickles)}): "
                              f"{PICKLE_ADVICE}")
    raise CheckpointError(f"{folder}: no weights: expected {SINGLE} or {INDEX} with its shards")


def read_index(index: Path) -> dict[str, str]:
    """``weight_map`` of a shard index: tensor name -> shard file name (validated)."""
    try:
        d = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: missing or empty 'weight_map'")
    for name, shard in wm.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise CheckpointError(f"{index}: weight_map[{name!r}]={shard!r} is not a shard file name")
        refuse_pickle(Path(shard))
    return wm


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the folder's weight files: ({name: tensor}, {name: file}), on the CPU.

    A truncated or corrupt file raises CheckpointError naming it; so do a name found in two files
    and (with an index) a name the index places in another shard or one it lists but no shard holds.
    """
    files = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    if name in tensors:
                        raise CheckpointError(f"{f}: tensor {name!r} also appears in {sources[name]}")
                    # get_tensor views a private mmap of the file: copy to own the memory, so a
                    # later in-place rewrite of the file can never fault the loaded model
                    tensors[name] = fh.get_tensor(name).clone()
                    sources[name] = f
        except CheckpointError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file, it is truncated or corrupt "
                                  f"({type(e).__name__}: {e})") from None
    _check_index(folder, sources)
    return tensors, sources


def _check_index(folder: Path, sources: dict[str, Path]) -> None:
    """With a shard index: every tensor it lists is in the shard it names."""
    index = folder / INDEX
    if index.is_file():
        for name, shard in read_index(index).items():
            if name not in sources:
                raise CheckpointError(f"{index}: lists tensor {name!r} in {shard}, which does not hold it")
            if sources[name].name != shard:
                raise CheckpointError(f"{index}: places tensor {name!r} in {shard}, but it is in "
                                      f"{sources[name].name}")


# safetensors dtype -> (torch's name for it, numpy dtype of the stored bits; bf16 as its uint16 bits)
_NUMPY = {"F64": ("float64", "<f8"), "F32": ("float32", "<f4"), "F16": ("float16", "<f2"),
          "BF16": ("bfloat16", "<u2"), "I64": ("int64", "<i8"), "I32": ("int32", "<i4"),
          "I16": ("int16", "<i2"), "I8": ("int8", "i1"), "U8": ("uint8", "u1"), "BOOL": ("bool", "?")}


class ArrayRef(NamedTuple):
    """Where one stored tensor's bytes are: read them with :func:`load_array` (numpy, no torch)."""

    file: Path
    offset: int                 # of the first byte in the file
    dtype: str                  # as torch names it ("bfloat16", "uint8", ...)
    np_dtype: str               # numpy dtype of the stored bits (bf16: "<u2", the bit patterns)
    shape: tuple[int, ...]


def array_refs(folder: Path) -> tuple[dict[str, ArrayRef], dict[str, Path]]:
    """Every tensor of the folder's weight files as an :class:`ArrayRef`, without reading the data:
    ({name: ref}, {name: file}). The safetensors library checks each file (header, offsets, size: a
    truncated or corrupt file raises CheckpointError naming it); its numpy view has no bfloat16, so
    the offsets come from the file's JSON header (8-byte little-endian length, then the header) and
    :func:`load_array` reads the bytes itself, one tensor (or row range) at a time, so a loader never
    holds more than the tensor it converts.
    """
    refs: dict[str, ArrayRef] = {}
    sources: dict[str, Path] = {}
    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="numpy") as fh:     # the library's own validation
                names = list(fh.keys())
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file, it is truncated or corrupt "
                                  f"({type(e).__name__}: {e})") from None
        for name in names:
            if name in refs:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {sources[name]}")
            info = header[name]
            if info["dtype"] not in _NUMPY:
                raise CheckpointError(f"{f}: tensor {name!r} has dtype {info['dtype']}, which bitnet158 "
                                      f"does not read")
            torch_name, np_dtype = _NUMPY[info["dtype"]]
            refs[name] = ArrayRef(f, 8 + n + info["data_offsets"][0], torch_name, np_dtype, tuple(info["shape"]))
            sources[name] = f
    _check_index(folder, sources)
    return refs, sources


def load_array(ref: ArrayRef, row0: int = 0, row1: int | None = None, out=None):
    """Rows ``row0:row1`` (all by default) of a stored tensor as a numpy array of its stored bits,
    read from the file (into ``out``, a C-contiguous array of that many bytes, when given)."""
    import numpy as np

    dt = np.dtype(ref.np_dtype)
    shape = ref.shape or (1,)
    row1 = shape[0] if row1 is None else row1
    row_items = int(np.prod(shape[1:], dtype=np.int64))
    count = (row1 - row0) * row_items
    if out is None:
        out = np.empty((row1 - row0, *shape[1:]), dtype=dt)
    buf = memoryview(out).cast("B")
    if buf.nbytes != count * dt.itemsize:
        raise ValueError(f"load_array: out holds {buf.nbytes} bytes, rows {row0}:{row1} of {ref.shape} "
                         f"need {count * dt.itemsize}")
    with open(ref.file, "rb") as fh:
        fh.seek(ref.offset + row0 * row_items * dt.itemsize)
        got = fh.readinto(buf)
    if got != buf.nbytes:
        raise CheckpointError(f"{ref.file}: truncated while reading a tensor ({got} of {buf.nbytes} bytes)")
    return out.reshape(ref.shape) if ref.shape == () else out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_weights(folder: Path, tensors: dict[str, torch.Tensor],
                  max_shard_bytes: int | None = None) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or, past ``max_shard_bytes``, shards + index.

    Tensors are kept in the given order and never split; a tensor larger than the limit gets a
    shard of its own. Returns the file names written.
    """
    from safetensors.torch import save_file   # (torch only where weights are written: the
                                              # torch-free CPU engine reads folders with this module)
    meta = {"format": "pt"}  # transformers expects it
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    total = sum(_nbytes(t) for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / SINGLE), metadata=meta)
        return [SINGLE]
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes} must be positive")
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if groups[-1] and size + _nbytes(t) > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += _nbytes(t)
    n = len(groups)
    names, weight_map = [], {}
    for i, g in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(g, str(folder / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in g})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": weight_map}, indent=2) + "\n")
    return names + [INDEX]


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it becomes ``path``.

    An existing ``path`` is replaced only if it is empty or a model folder (has ``config.json``);
    the swap is two renames, so a crash leaves either the old or the new folder, never a mix (at
    worst a stray ``.{name}.tmp-*`` / ``.old-*`` sibling). On error the temporary folder is removed.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: exists and is not a folder")
        if any(path.iterdir()) and not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: refusing to replace a non-empty folder that is not a "
                                  "model folder (no config.json); choose a new or empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # make the contents durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~umask)  # mkstemp-style 0600 files -> ordinary permissions
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            old.rmdir()
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
