"""Reading an uploaded weights file without running anything in it (POST /models).

Two forms are accepted: safetensors (a JSON header, then raw tensor bytes) and a PyTorch
``state_dict`` written by ``torch.save`` (a zip whose ``data.pkl`` is a pickle). A pickle is
a program: unpickling calls whatever its GLOBAL/REDUCE opcodes name, so a file can run
``os.system`` the moment it is loaded. The API never imports torch, so it reads the pickle
with :class:`_TensorsOnly` (this module's only use of ``pickle``), an unpickler that
resolves only the names a state_dict needs (``collections.OrderedDict``, torch's tensor and
storage rebuilders) to inert stand-ins that record each tensor's shape, and refuses any other
name before anything is called. The worker later loads the same bytes with
``torch.load(weights_only=True)``, torch's own restricted unpickler. :func:`check_fits`
compares names and shapes with the architecture's ``state_dict``
(``shared/architectures.json``), as a strict ``load_state_dict`` would. Each refusal is a
422 naming what is wrong (docs/design.md "Uploaded models").
"""

from __future__ import annotations

import io
import json
import pickle  # nosec B403
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, Any

from shared.architectures import expected_shapes
from shared.errors import Unprocessable

# The safetensors header is JSON of a few hundred bytes per tensor.
MAX_SAFETENSORS_HEADER = 64 * 1024 * 1024
# data.pkl of a state_dict holds names and shapes only; the tensors are other zip members.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
SAFETENSORS_DTYPES = (
    *("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"),
    *("I64", "I32", "I16", "I8", "U8", "BOOL"),
)
_STORAGES = (
    *("DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage"),
    *("LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage"),
)
# torch names a tensor's dtype by these in newer files (GLOBAL 'torch float32')
_DTYPES = (
    *("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8"),
    "bool",
)
SHOWN = 5


class UnsafeWeights(Unprocessable):
    """The file would run code when loaded (a pickle naming something besides tensors)."""

    code = "unsafe_weights"


class NotAStateDict(Unprocessable):
    """Neither a safetensors file nor a ``torch.save`` state_dict of tensors."""

    code = "not_a_state_dict"


class WeightsMismatch(Unprocessable):
    """Tensor names or shapes that do not fit the architecture (a strict load would fail)."""

    code = "weights_mismatch"


@dataclass(frozen=True)
class WeightsFile:
    format: str  # "safetensors" or "pytorch"
    # tensor name -> shape, in the file's order
    shapes: dict[str, tuple[int, ...]]


def inspect_weights(stream: IO[bytes]) -> WeightsFile:
    """The tensors' names and shapes of a seekable weights file; :class:`UnsafeWeights` or
    :class:`NotAStateDict` for anything else. Nothing in the file is executed."""
    stream.seek(0)
    head = stream.read(8)
    stream.seek(0)
    if head[:4] == b"PK\x03\x04":
        return WeightsFile("pytorch", _zip_state_dict(stream))
    if head[:1] == b"\x80":
        # A bare pickle (torch's legacy format, or anything pickle.dump wrote): read with the
        # same refusals, then refused anyway — its tensors would follow in a format torch
        # itself no longer writes.
        _unpickle(stream.read(MAX_PICKLE_BYTES), zip_entries=None)
        raise NotAStateDict(
            "a bare pickle, not a torch.save zip: save the state_dict with torch.save() "
            "(PyTorch ≥ 1.6) or as safetensors"
        )
    return WeightsFile("safetensors", _safetensors(stream))


def check_fits(weights: WeightsFile, architecture: str) -> None:
    """:class:`WeightsMismatch` naming the first missing, unexpected and misshapen tensors
    when ``weights`` is not exactly ``architecture``'s state_dict."""
    expected = expected_shapes(architecture)
    got = weights.shapes
    missing = [name for name in expected if name not in got]
    unexpected = [name for name in got if name not in expected]
    misshapen = [
        f"{name} {list(got[name])} (expected {list(shape)})"
        for name, shape in expected.items()
        if name in got and tuple(got[name]) != shape
    ]
    problems = [
        f"{what}: {_first(names)}"
        for what, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", misshapen),
        )
        if names
    ]
    if problems:
        raise WeightsMismatch(
            f"the weights do not fit torchvision's {architecture} "
            f"({len(expected)} tensors expected, {len(got)} in the file): " + "; ".join(problems)
        )


def _first(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _safetensors(stream: IO[bytes]) -> dict[str, tuple[int, ...]]:
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise NotAStateDict("the file is too short to be safetensors or a torch.save zip")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > min(MAX_SAFETENSORS_HEADER, size - 8):
        raise NotAStateDict(
            "neither a safetensors file (its first 8 bytes are not a header length that fits "
            "the file) nor a torch.save zip"
        )
    try:
        header = json.loads(stream.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAStateDict(f"not a safetensors file: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise NotAStateDict("not a safetensors file: its header is not a JSON object")
    data_size = size - 8 - header_size
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shapes[name] = _safetensors_entry(name, entry, data_size)
    return shapes


def _safetensors_entry(name: str, entry: Any, data_size: int) -> tuple[int, ...]:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = (
            dtype in SAFETENSORS_DTYPES
            and all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
            and begin <= end <= data_size
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise NotAStateDict(f"safetensors entry {name!r} is malformed: {entry!r:.200}")
    return tuple(shape)


def _zip_state_dict(stream: IO[bytes]) -> dict[str, tuple[int, ...]]:
    try:
        archive = zipfile.ZipFile(stream)
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise NotAStateDict("a zip, but not one torch.save wrote (no single data.pkl)")
        info = archive.getinfo(pickles[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise NotAStateDict(f"data.pkl is {info.file_size} bytes: not a state_dict's")
        prefix = pickles[0][: -len("data.pkl")]
        entries = {n[len(prefix + "data/") :] for n in archive.namelist()}
        state = _unpickle(archive.read(info), zip_entries=entries)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise NotAStateDict(f"a damaged zip: {exc}") from exc
    return _shapes_of(state)


def _shapes_of(state: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(state, dict) or not state:
        raise NotAStateDict(
            f"the file holds a {type(state).__name__}, not a state_dict (a dict of tensor "
            "names to tensors, as model.state_dict() gives)"
        )
    shapes = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, _Tensor):
            raise NotAStateDict(
                f"entry {name!r:.80} is a {type(value).__name__}, not a tensor: the file is "
                "not a plain state_dict (a checkpoint with an optimizer or epoch? save "
                "model.state_dict())"
            )
        shapes[name] = value.shape
    return shapes


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]


def _rebuild_tensor(storage: Any, _offset: Any, size: Any, *_rest: Any) -> _Tensor:
    if not isinstance(storage, _Storage) or not all(isinstance(n, int) and n >= 0 for n in size):
        raise NotAStateDict("a tensor in data.pkl is malformed")
    return _Tensor(tuple(size))


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
    **{("torch", name): _StorageType(name) for name in _DTYPES},
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
}


class _TensorsOnly(pickle.Unpickler):
    """Resolves only the names in ``_ALLOWED``, to stand-ins that call nothing."""

    def __init__(self, data: bytes, zip_entries: set[str] | None) -> None:
        super().__init__(io.BytesIO(data))
        self.zip_entries = zip_entries

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafeWeights(
                f"the file would run code when loaded: its pickle calls {module}.{name}, which "
                "no state_dict needs (only tensors and OrderedDict are read); refused without "
                "running it"
            )
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise NotAStateDict("data.pkl refers to something that is not a tensor's storage")
        _kind, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise NotAStateDict("data.pkl names a storage it does not describe")
        if self.zip_entries is None or key not in self.zip_entries:
            raise NotAStateDict(f"data.pkl names storage {key!r:.40}, which the zip lacks")
        return _Storage(storage_type.dtype, key)


def _unpickle(data: bytes, *, zip_entries: set[str] | None) -> Any:
    try:
        return _TensorsOnly(data, zip_entries).load()
    except (UnsafeWeights, NotAStateDict):
        raise
    except Exception as exc:
        # A malformed pickle: stack underflow, bad opcodes, a stand-in called wrongly.
        raise NotAStateDict(f"the pickle in the file cannot be read: {exc}") from exc
