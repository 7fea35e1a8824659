"""Reads PyTorch (``.pth``/``.pth.tar``/``.pt``), ``.npz`` and ``.safetensors`` weights into NumPy, without torch.

PyTorch files are pickles. They are read by a restricted unpickler that admits only the globals needed to
rebuild tensors (the tensor part of what ``torch.load(weights_only=True)`` allows) and implements each of
them itself, so no code from the file can run. Any other global becomes an inert record of its name and
arguments (:class:`_Opaque`: nothing of the named class or function is imported or called): where the
weights are, that is refused with an error naming the global; elsewhere (the ``meta`` of mmsegmentation
checkpoints, with NumPy scalars or mmengine objects that ``weights_only=True`` refuses) it is dropped.
Tensor data is read lazily from a memory map of the file, so an optimizer state stored beside the weights
is never read.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# The first pickle of a legacy (non-zip, ``_use_new_zipfile_serialization=False``) torch file.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class / dtype name -> NumPy dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float64": np.float64,
    "double": np.float64,
    "float32": np.float32,
    "float": np.float32,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# The most memory a view that repeats its storage's elements (strides 0, overlapping) may fill.
_MAX_EXPANDED_BYTES = 1 << 28
# Keys under which training scripts store the model's weights beside other state (optimizer, epoch, ...).
_WRAPPER_KEYS = ("state_dict", "model")


class CheckpointReadError(ValueError):
    """A weights file cannot be read: not a checkpoint, truncated, or of an unsupported format."""


class UnsafeCheckpointError(CheckpointReadError):
    """A pickle holds an object of a global outside the tensor-rebuild allowlist where the weights are (loaded
    by torch, it could run code)."""


@dataclasses.dataclass
class _Storage:
    """A typed torch storage: ``numel`` elements of ``dtype`` at ``offset`` bytes into a memory-mapped file."""

    data: np.ndarray  # uint8 view of the whole file
    offset: int
    numel: int
    dtype: np.dtype
    byteswap: bool = False

    def elements(self) -> np.ndarray:
        nbytes = self.numel * self.dtype.itemsize
        if self.offset + nbytes > self.data.size:
            raise EOFError(f"storage data ends at byte {self.offset + nbytes} of a {self.data.size}-byte file")
        flat = self.data[self.offset : self.offset + nbytes].view(self.dtype)
        return flat.byteswap() if self.byteswap else flat


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A tensor not read yet: a strided view into a storage (``torch._utils._rebuild_tensor_v2``)."""

    storage: _Storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype | None = None  # _rebuild_tensor_v3 names the dtype itself

    def numpy(self) -> np.ndarray:
        elements = self.storage.elements()
        if self.dtype is not None and np.dtype(self.dtype) != elements.dtype:
            elements = elements.view(self.dtype)
        # Checked before as_strided, which would otherwise read memory outside the file's buffer.
        if len(self.size) != len(self.stride) or min((self.storage_offset, *self.size, *self.stride)) < 0:
            raise ValueError(f"invalid tensor view: offset {self.storage_offset}, size {self.size}")
        last = self.storage_offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if all(self.size) and last >= elements.size:
            raise ValueError(f"tensor view of shape {self.size} runs past its storage of {elements.size}")
        count = math.prod(self.size)
        if count > elements.size and count * elements.itemsize > _MAX_EXPANDED_BYTES:
            # Overlapping strides (0 for an expanded dimension) repeat a storage's elements: a few bytes of file
            # could ask for gigabytes of memory.
            raise ValueError(
                f"tensor view of shape {self.size} repeats its storage of {elements.size} elements into "
                f"{count * elements.itemsize} bytes"
            )
        if not all(self.size):
            return np.zeros(self.size, elements.dtype)
        view = np.lib.stride_tricks.as_strided(
            elements[self.storage_offset :],
            shape=self.size,
            strides=tuple(s * elements.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view, order="C")  # owned and contiguous: independent of the file


class _Opaque:
    """An object of a global outside the allowlist, kept as inert data: the pickle's arguments, state and
    items are recorded, and nothing of the named class or function runs. Subclassed per global."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        record = object.__new__(cls)
        record.args, record.kwargs, record.state, record.items = args, kwargs, None, []
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))


def _opaque_name(value: Any, depth: int = 4, seen: set[int] | None = None) -> str | None:
    """The global an :class:`_Opaque` record (or its class) stands for, also inside tuples, lists and dicts
    ``depth`` levels down (each container looked into once: a pickle can make a list hold itself); None for
    anything else."""
    if isinstance(value, _Opaque) or (isinstance(value, type) and issubclass(value, _Opaque)):
        return value.global_name
    seen = set() if seen is None else seen
    if depth > 0 and isinstance(value, tuple | list | Mapping) and id(value) not in seen:
        seen.add(id(value))
        for item in value.values() if isinstance(value, Mapping) else value:
            name = _opaque_name(item, depth - 1, seen)
            if name:
                return name
    return None


class _Marker:
    """Stands for an admitted torch class (a storage type, dtype, ``Tensor`` or ``Parameter``)."""

    def __init__(self, name: str, dtype: Any = None) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<torch.{self.name}>"


def _rebuilt(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None) -> Any:
    """A tensor's record: a :class:`_Tensor`, or, on an :class:`_Opaque` storage, a record of that storage's
    global (refused where the weights are, dropped elsewhere, as the storage would be)."""
    if _opaque_name(storage, depth=0):
        return (storage if isinstance(storage, type) else type(storage))()  # a record of the storage's global
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor's storage is a {type(storage).__name__}, not a storage record")
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride), dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _rebuilt(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuilt(storage, storage_offset, size, stride, np.dtype(dtype.dtype))


def _bytearray(source: Any = b"", *args: Any) -> bytearray:
    # bytearray(n) from a pickle would allocate n bytes for a few bytes of file: only copies of data it holds.
    if isinstance(source, int):
        raise ValueError(f"bytearray({source}) in the pickle: only bytearrays of given bytes are admitted")
    return bytearray(source, *args)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)  # func came through find_class, so it is one of ours


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The admitted globals, made afresh for each file: a pickle can set attributes on what it gets
    (BUILD), and that must not leak into the next file read."""

    def fresh(function: Callable) -> Callable:
        return lambda *args, **kwargs: function(*args, **kwargs)

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): _bytearray,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 pickles bytes
        ("torch._utils", "_rebuild_tensor_v2"): fresh(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): fresh(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): fresh(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): fresh(_rebuild_parameter),
        ("torch._tensor", "_rebuild_from_type_v2"): fresh(_rebuild_from_type_v2),
        ("torch", "Tensor"): _Marker("Tensor"),
        ("torch.nn.parameter", "Parameter"): _Marker("Parameter"),
        ("torch", "Size"): tuple,
        ("torch", "device"): str,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _Marker(name, np.dtype(dtype))
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _Marker(name, np.dtype(dtype))
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals of :func:`_allowed_globals`, every other one as an :class:`_Opaque` record;
    ``storage_for`` resolves storage ids."""

    def __init__(self, file: Any, path: Path, storage_for: Callable[..., _Storage] | None) -> None:
        super().__init__(file)
        self._path, self._storage_for = path, storage_for
        self._allowed = _allowed_globals()
        self._opaque: dict[tuple[str, str], type] = {}  # one record class per global: not one per reference

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol 2 writes Python 2 names (fix_imports)
            module = "builtins"
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if (module, name) not in self._opaque:
            self._opaque[(module, name)] = type(
                str(name)[:100], (_Opaque,), {"global_name": f"{module}.{name}", "__module__": __name__}
            )
        return self._opaque[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_for is None or not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointReadError(f"{self._path}: unsupported persistent id in the pickle: {pid!r:.200}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _Marker) or storage_type.dtype is None:
            raise CheckpointReadError(f"{self._path}: unsupported storage type {storage_type!r}")
        if int(numel) < 0 or (view is not None and min(int(view[1]), int(view[2])) < 0):
            raise CheckpointReadError(f"{self._path}: corrupt storage record {pid!r:.200}")
        return self._storage_for(str(key), storage_type.dtype, int(numel), view)


def _refuse(path: Path, global_name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refusing to unpickle the global {global_name} where the weights are: only tensor data is "
        "admitted there (a checkpoint that needs it may run code when loaded). If you trust the file, "
        "re-save its weights with torch.save(model.state_dict(), ...) or as .safetensors"
    )


def _unpickle(file: Any, path: Path, storage_for: Callable[..., _Storage] | None) -> Any:
    try:
        return _RestrictedUnpickler(file, path, storage_for).load()
    except CheckpointReadError:
        raise
    except EOFError as error:
        raise CheckpointReadError(f"{path}: the pickle ends early; the file is truncated") from error
    except Exception as error:  # a corrupt stream raises anything from UnpicklingError to IndexError
        raise CheckpointReadError(f"{path}: not a readable PyTorch pickle ({error})") from error


def _read_zip(path: Path, data: np.ndarray) -> dict[str, np.ndarray]:
    """A ``torch.save`` zip archive (``<name>/data.pkl`` + ``<name>/data/<key>``) or an ``.npz``."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise CheckpointReadError(
            f"{path}: starts like a zip archive (the PyTorch >= 1.6 or .npz format) but its directory "
            f"cannot be read; the file is truncated or corrupt ({error})"
        ) from error
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            if members and all(name.endswith(".npy") for name in members):
                return _read_npz(path)
            raise CheckpointReadError(
                f"{path}: a zip archive that is neither a torch.save checkpoint (no <name>/data.pkl) nor an .npz"
            )
        root = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(root + "byteorder").decode() if root + "byteorder" in members else "little"

        def storage_for(key: str, dtype: np.dtype, numel: int, view: Any) -> _Storage:
            info = members.get(f"{root}data/{key}")
            if info is None:
                raise CheckpointReadError(f"{path}: storage {root}data/{key} is missing from the archive")
            byteswap = byteorder != "little"
            if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; read it whole then
                return _Storage(np.frombuffer(archive.read(info), np.uint8), 0, numel, dtype, byteswap)
            # Data follows the 30-byte local header, the name and the extra field.
            header = data[info.header_offset : info.header_offset + 30].tobytes()
            if len(header) < 30:
                raise CheckpointReadError(f"{path}: truncated before storage {info.filename}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if info.file_size < numel * dtype.itemsize:
                raise CheckpointReadError(f"{path}: storage {info.filename} is shorter than its tensor")
            return _Storage(data, start, numel, dtype, byteswap)

        with archive.open(pickles[0]) as file:
            return _state_dict_of(_unpickle(file, path, storage_for), path)


def _read_torch_legacy(path: Path, data: np.ndarray) -> dict[str, np.ndarray]:
    """The pre-1.6 format: pickles of magic, protocol, sys_info, the object, the storage keys; then each
    storage as a little-endian int64 element count and its raw bytes, in the order of the keys."""
    with open(path, "rb") as file:
        magic = _unpickle(file, path, None)
        if _opaque_name(magic):
            raise _refuse(path, _opaque_name(magic))
        if magic != _LEGACY_MAGIC:
            raise CheckpointReadError(f"{path}: a pickle, but not one written by torch.save")
        protocol = _unpickle(file, path, None)
        if protocol != _LEGACY_PROTOCOL:
            raise CheckpointReadError(f"{path}: unsupported legacy torch protocol version {protocol}")
        sys_info = _unpickle(file, path, None)
        little_endian = not isinstance(sys_info, Mapping) or sys_info.get("little_endian", True)
        dtypes: dict[str, np.dtype] = {}
        placed: list[tuple[str, int, _Storage]] = []

        # A storage's place in the file is known only after the pickle: tensors get a storage whose
        # offset the loop below sets.
        def storage_for(key: str, dtype: np.dtype, numel: int, view: Any) -> _Storage:
            dtypes.setdefault(key, dtype)
            element_offset = 0
            if view is not None:  # (view key, element offset, numel) into the root storage `key`
                element_offset, numel = int(view[1]), int(view[2])
            storage = _Storage(data, -1, numel, dtype, byteswap=not little_endian)
            placed.append((key, element_offset, storage))
            return storage

        result = _unpickle(file, path, storage_for)
        keys = _unpickle(file, path, None)
        offset = file.tell()
    located: dict[str, int] = {}
    for key in keys:
        if offset + 8 > data.size:
            raise CheckpointReadError(f"{path}: truncated in the tensor data (storage {key})")
        if key not in dtypes:
            raise CheckpointReadError(f"{path}: storage {key} is listed but used by no tensor")
        numel = int(data[offset : offset + 8].view("<i8")[0])
        located[key] = offset + 8
        offset += 8 + numel * dtypes[key].itemsize
    if offset > data.size:
        raise CheckpointReadError(f"{path}: truncated in the tensor data ({data.size} of {offset} bytes)")
    for key, element_offset, storage in placed:
        if key not in located:
            raise CheckpointReadError(f"{path}: storage {key} has no data in the file")
        storage.offset = located[key] + element_offset * storage.dtype.itemsize
    return _state_dict_of(result, path)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:  # object arrays would need pickle: refused
        raise CheckpointReadError(f"{path}: an .npz holding pickled objects; only arrays are read") from error
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CheckpointReadError(f"{path}: not a readable .npz; the file is truncated or corrupt") from error


def _read_safetensors(path: Path, data: np.ndarray) -> dict[str, np.ndarray]:
    # Format: little-endian u64 header length, JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
    if data.size < 8:
        raise CheckpointReadError(f"{path}: too short for a .safetensors file")
    header_len = int(data[:8].view("<u8")[0])
    if 8 + header_len > data.size:
        raise CheckpointReadError(f"{path}: .safetensors header runs past the end; the file is truncated")
    try:
        header = json.loads(data[8 : 8 + header_len].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointReadError(f"{path}: not a .safetensors file (unreadable header)") from error
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{path}: not a .safetensors file (the header is not a JSON object)")
    base = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, (begin, end) = entry["dtype"], map(int, entry["data_offsets"])
            shape = tuple(int(n) for n in entry["shape"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointReadError(f"{path}: malformed .safetensors entry for {name}: {entry!r:.200}") from error
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointReadError(f"{path}: tensor {name} has the unsupported dtype {dtype_name}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        if base + end > data.size:
            raise CheckpointReadError(f"{path}: tensor {name} runs past the end; the file is truncated")
        if not 0 <= begin <= end or min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointReadError(f"{path}: tensor {name}: bytes {begin}..{end} do not fit shape {shape}")
        out[name] = np.array(data[base + begin : base + end].view(dtype).reshape(shape))
    return out


def _state_dict_of(obj: Any, path: Path) -> dict[str, np.ndarray]:
    """Unwraps ``{'state_dict': ...}`` (official training checkpoints) and reads the tensors it holds; records
    of other globals (:class:`_Opaque`) are refused there and dropped with the rest of the wrapper."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
            if _opaque_name(obj.get(key)):
                raise _refuse(path, _opaque_name(obj[key]))
    if _opaque_name(obj):  # the weights (or what stands in their place) hold a record, at any of a few levels
        raise _refuse(path, _opaque_name(obj))
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointReadError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)"
        )
    not_tensors = [str(key) for key, value in obj.items() if not isinstance(value, _Tensor)]
    if not_tensors:
        raise CheckpointReadError(
            f"{path}: not a state_dict: entries {not_tensors[:10]} are not tensors "
            f"(top-level keys: {list(obj)[:10]}; weights are looked for under {_WRAPPER_KEYS})"
        )
    out = {}
    for key, value in obj.items():
        try:
            out[str(key)] = value.numpy()
        except (EOFError, ValueError) as error:
            raise CheckpointReadError(
                f"{path}: tensor {key} cannot be read; the file is truncated or corrupt ({error})"
            ) from error
    return out


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads the weights of a checkpoint file as ``{key: np.ndarray}`` in PyTorch layout (e.g. OIHW).

    Formats (told by content, not by name): ``torch.save`` files in the zip format (PyTorch >= 1.6) and
    the legacy pickle format, ``.npz`` and ``.safetensors``. A training checkpoint
    ``{'epoch', 'state_dict', 'optimizer', ...}`` yields its ``state_dict`` only; the optimizer's tensors
    are never read, and the other entries may hold objects of any class (read as inert records, dropped).
    Arrays keep the stored dtype (float16/bfloat16/float32/float64/int64/...). Raises
    :class:`CheckpointReadError` naming the file, or :class:`UnsafeCheckpointError` for a pickle whose weights
    reference anything but tensor data.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".pt", ".tar", ".npz", ".safetensors"))
        inside = f" ({', '.join(found[:5])})" if found else ""
        raise CheckpointReadError(f"{path}: a directory, not a checkpoint file: give the file inside it{inside}")
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointReadError(f"{path}: empty file; not a checkpoint")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    magic = data[:8].tobytes()
    if magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _read_zip(path, data)
    if magic[:1] == b"\x80":  # pickle protocol >= 2: the legacy torch format
        return _read_torch_legacy(path, data)
    if len(magic) == 8 and data.size > 9 and data[8:9].tobytes() == b"{":
        return _read_safetensors(path, data)
    raise CheckpointReadError(
        f"{path}: not a checkpoint: expected a torch.save file (.pth, .pth.tar, .pt), .npz or .safetensors"
    )
