"""Read NVlabs' network pickles (EDM's `edm-*.pkl`, `network-snapshot-*.pkl`) without running them.

Those files are plain pickles of {'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs':
...}; every network object goes through NVlabs' `torch_utils.persistence`, whose reduce is

    _reconstruct_persistent_obj({'type': 'class', 'version': 6, 'module_src': <Python source>,
                                 'class_name': 'VPPrecond', 'state': <the module's __dict__>})

and unpickling them normally would `exec` that source. Here nothing is imported and nothing is
executed: `find_class` maps the handful of globals such a file needs to inert stand-ins defined in
this module (tensor rebuilds that copy bytes, records that keep a name and a state dict) and
rejects every other global with CheckpointError. Tensors arrive either through torch's storage
reduce (`torch.storage._load_from_bytes` with a nested legacy `torch.save` stream, what a plain
`pickle.dump` of a tensor writes) or as persistent ids of `torch.save` files (zip or legacy).

`read_network(path)` returns the `ema` network's state dict (names as `state_dict()` would give
them), its class name and constructor kwargs (`init_kwargs`).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import CheckpointError
from pipeline.unpickle import prescan

# torch.save's legacy stream starts with these (torch/serialization.py).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
# Classes pickled by reference (copyreg) inside NVlabs networks; they become records, never classes.
RECORD_CLASSES = {
    ("torch.nn.modules.container", "ModuleDict"), ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.container", "Sequential"),
}
PERSISTENCE = ("torch_utils.persistence", "_reconstruct_persistent_obj")
EASYDICT = ("dnnlib.util", "EasyDict")


# --- inert stand-ins -------------------------------------------------------------------------

def _refuse_state(self, state) -> None:
    """A stand-in's __setstate__: a BUILD opcode aimed at it would otherwise rewrite its fields
    (a size that is a string, a state that is a number) and fail later with a bare TypeError."""
    raise CheckpointError(f"the pickle sets state on a {type(self).__name__} record, which a network checkpoint never does")


class Record:
    """An object pickled by class reference (a torch container module): its class name and state."""

    qualname = "?"

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict) or hasattr(self, "state"):
            raise CheckpointError(f"the pickle sets a {type(state).__name__} state on {self.qualname}"
                                  f"{' twice' if hasattr(self, 'state') else ''}; a torch container's state is one dict")
        self.state = state

    def __repr__(self) -> str:
        return f"Record({self.qualname})"


@dataclass
class PersistentObject:
    """An NVlabs persistent object: the class name and state, with its source kept as text only."""

    class_name: str
    module_src: str
    state: dict

    __setstate__ = _refuse_state


class _EasyDict(dict):
    """dnnlib.util.EasyDict, a dict subclass: its items arrive through SETITEMS."""

    def __setstate__(self, state) -> None:
        if state:
            raise CheckpointError(f"an EasyDict carries unexpected attributes {sorted(state)!r}")


class _Object:
    """`builtins.object`, only as copyreg._reconstructor's base argument."""

    __setstate__ = _refuse_state


@dataclass
class StorageRef:
    """A storage named by a persistent id; its bytes are filled in once the stream has them."""

    key: str
    dtype: torch.dtype
    numel: int
    data: torch.Tensor | None = None

    __setstate__ = _refuse_state


@dataclass
class TensorRef:
    """A tensor waiting for its storage's bytes (legacy streams write them after the pickle)."""

    storage: StorageRef
    offset: int
    size: tuple
    stride: tuple

    __setstate__ = _refuse_state


def _storage_type(name: str):
    dtype = STORAGE_DTYPES[name]

    class StorageType:
        __setstate__ = _refuse_state

    StorageType.dtype = dtype
    StorageType.__qualname__ = StorageType.__name__ = name
    return StorageType


def _ints(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"tensor record has a malformed {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2, as a record: (storage, offset, size, stride)."""
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor record has no storage (got {type(storage).__name__})")
    if not isinstance(storage_offset, int):
        raise CheckpointError(f"tensor record has a malformed storage offset {storage_offset!r}")
    return TensorRef(storage, storage_offset, _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """A parameter is its data: the network is rebuilt by our own classes."""
    if not isinstance(data, TensorRef):
        raise CheckpointError(f"parameter record holds {type(data).__name__}, not a tensor")
    return data


def _reconstructor(cls, base, state):
    """copyreg._reconstructor for the record classes only."""
    if (not (isinstance(cls, type) and issubclass(cls, Record)) or not (isinstance(base, type) and issubclass(base, _Object))
            or state is not None):
        raise CheckpointError(f"unexpected copyreg reconstruction of {cls!r}")
    return cls.__new__(cls)


def _reconstruct_persistent_obj(meta):
    """NVlabs' persistence hook, without its exec: keeps class name and state as data."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError(f"persistent object record is not a class record: {type(meta).__name__}")
    name, src, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if not isinstance(name, str) or not isinstance(src, str) or not isinstance(state, dict):
        raise CheckpointError(f"persistent object record {name!r} lacks class_name, module_src or state")
    return PersistentObject(name, src, state)


def _record_class(module: str, name: str) -> type:
    return type(name, (Record,), {"qualname": f"{module}.{name}"})


def _load_from_bytes(data):
    """torch.storage._load_from_bytes: a nested legacy torch.save stream holding one storage."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError(f"storage record holds {type(data).__name__}, not bytes")
    storage = _read_legacy(io.BytesIO(bytes(data)), "<storage bytes>")
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"storage record holds {type(storage).__name__}, not a storage")
    return storage


def _set(items=()):
    return set(items)


def _encode(text, encoding="latin1"):
    """_codecs.encode, as protocol-2 pickles store bytes: latin-1 text back to bytes only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise CheckpointError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r}) in a pickle")
    return text.encode("latin1")


def _fresh(fn):
    """A new function object calling `fn`: what one load may alter (a BUILD opcode setting
    attributes on a global) dies with that load instead of changing every later one."""

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = fn.__name__
    return call


def _globals() -> dict[tuple[str, str], object]:
    """The stand-ins of one load: new classes and function objects each time (see `_fresh`)."""
    easydict = type("_EasyDict", (_EasyDict,), {})
    obj = type("_Object", (_Object,), {})
    table = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
        ("collections", "OrderedDict"): dict,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("builtins", "object"): obj,
        ("builtins", "set"): _set,
        ("_codecs", "encode"): _encode,
        PERSISTENCE: _reconstruct_persistent_obj,
        EASYDICT: easydict,
    }
    table = {key: _fresh(value) if not isinstance(value, type) else value for key, value in table.items()}
    table.update({("torch", name): _storage_type(name) for name in STORAGE_DTYPES})
    table.update({key: _record_class(*key) for key in RECORD_CLASSES})
    # Protocol 2 (torch.save's) writes Python 2 names for these.
    table[("__builtin__", "object")] = obj
    table[("__builtin__", "set")] = table[("builtins", "set")]
    table[("copy_reg", "_reconstructor")] = table[("copyreg", "_reconstructor")]
    return table


GLOBALS = frozenset(_globals())
"""The (module, name) pairs a network pickle may refer to."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals are GLOBALS' stand-ins; any other global is a CheckpointError.

    storages: the persistent-id resolver (key, dtype, numel) -> StorageRef, or None where the
    stream should have no persistent ids.
    """

    def __init__(self, file, where: str, storages=None):
        super().__init__(file)
        self.where = where
        self.storages = storages
        self.globals = _globals()

    def find_class(self, module: str, name: str):
        try:
            return self.globals[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.where} refers to {module}.{name}, which a network checkpoint never needs; "
                "refusing to load it (it could run code)"
            ) from None

    def persistent_load(self, pid):
        if self.storages is None:
            raise CheckpointError(f"{self.where} has a persistent id {_short(pid)} where none is expected")
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # Legacy torch.save names each module class with its source (for a change warning): the class is all we keep.
            if isinstance(pid[1], type) and issubclass(pid[1], Record):
                return pid[1]
            raise CheckpointError(f"{self.where} has a module record of {_short(pid[1])}, which is not a torch container")
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise CheckpointError(f"{self.where} has an unknown persistent id {_short(pid)}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(getattr(storage_type, "dtype", None), torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.where} has a malformed storage id {_short(pid)}")
        if view is not None:
            raise CheckpointError(f"{self.where}: storage views ({_short(pid)}) are not supported")
        return self.storages(str(key), storage_type.dtype, numel)


def _short(value, n: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _load(f: io.BytesIO, where: str, storages=None):
    prescan(f, where, CheckpointError)
    try:
        return RestrictedUnpickler(f, where, storages).load()
    except CheckpointError as exc:
        if where in str(exc):
            raise
        raise CheckpointError(f"{where}: {exc}") from None  # a stand-in's refusal does not know the file
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            struct.error, RecursionError, OverflowError, MemoryError) as exc:
        # MemoryError, OverflowError: a corrupt length field asks for an impossible allocation.
        raise CheckpointError(f"{where} is not a readable pickle: {type(exc).__name__}: {exc}") from None


# --- the three containers: plain pickle, torch.save legacy stream, torch.save zip -----------

def _read_legacy(f: io.BufferedIOBase, where: str):
    """torch.save's legacy format: magic, protocol, sys_info, the pickle, storage keys, raw storages."""
    if _load(f, where) != LEGACY_MAGIC or _load(f, where) != LEGACY_PROTOCOL:
        raise CheckpointError(f"{where} is not a torch.save stream (wrong magic number or protocol)")
    info = _load(f, where)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise CheckpointError(f"{where} was written on a big-endian machine or lacks sys_info")
    refs: dict[str, StorageRef] = {}

    def storage(key: str, dtype: torch.dtype, numel: int) -> StorageRef:
        return refs.setdefault(key, StorageRef(key, dtype, numel))

    result = _load(f, where, storages=storage)
    keys = _load(f, where)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(refs):
        raise CheckpointError(f"{where}: the storage keys {keys!r} do not match the pickle's storages")
    for key in keys:
        ref = refs[str(key)]
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{where}: storage {key} is truncated")
        (numel,) = struct.unpack("<q", head)
        if numel != ref.numel:
            raise CheckpointError(f"{where}: storage {key} holds {numel} elements, its record says {ref.numel}")
        ref.data = _frombuffer(f.read(numel * _itemsize(ref.dtype)), ref, where)
    return result


def _read_zip(path: Path, where: str):
    """torch.save's zip format: {prefix}/data.pkl plus one raw file per storage under {prefix}/data/."""
    with zipfile.ZipFile(path) as archive:
        # torch.save stores its members uncompressed; refusing compressed ones bounds memory by the file's size.
        packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise CheckpointError(f"{where} has compressed members ({packed[0]}, ...); torch.save writes none")
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{where} is a zip without exactly one */data.pkl; not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]

        def storage(key: str, dtype: torch.dtype, numel: int) -> StorageRef:
            ref = StorageRef(key, dtype, numel)
            try:
                raw = archive.read(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{where}: storage {key} is missing from the archive") from None
            ref.data = _frombuffer(raw, ref, where)
            return ref

        with archive.open(pickles[0]) as f:
            return _load(io.BytesIO(f.read()), where, storages=storage)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _frombuffer(raw: bytes, ref: StorageRef, where: str) -> torch.Tensor:
    if len(raw) != ref.numel * _itemsize(ref.dtype):
        raise CheckpointError(f"{where}: storage {ref.key} has {len(raw)} bytes, expected {ref.numel} {ref.dtype} elements")
    if ref.numel == 0:
        return torch.empty(0, dtype=ref.dtype)
    buffer = bytearray(raw)
    view = torch.frombuffer(buffer, dtype=torch.uint8)
    data = view.clone()
    del view  # release the buffer export before the buffer itself goes
    return data.view(ref.dtype)


def _materialize(ref: TensorRef, where: str) -> torch.Tensor:
    """The tensor of a record, copied out of its storage after a bounds check."""
    flat = ref.storage.data
    if flat is None:
        raise CheckpointError(f"{where}: storage {ref.storage.key} has no data")
    if len(ref.size) != len(ref.stride) or ref.offset < 0 or any(s < 0 for s in ref.size + ref.stride):
        raise CheckpointError(f"{where}: tensor record with size {ref.size}, stride {ref.stride} is malformed")
    if 0 in ref.size:
        return torch.empty(ref.size, dtype=flat.dtype)
    # A saved weight never holds more elements than its storage, nor repeats one along a
    # dimension: a stride-0 view of one float declared 100000 x 100000 would clone into 40 GB.
    numel = 1
    for n in ref.size:
        numel *= n
    if numel > flat.numel():
        raise CheckpointError(f"{where}: tensor of size {ref.size} has {numel} elements, more than its storage "
                              f"holds ({flat.numel()}); refusing to expand it")
    if any(s == 0 and n > 1 for n, s in zip(ref.size, ref.stride)):
        raise CheckpointError(f"{where}: tensor of size {ref.size} has stride {ref.stride}: a zero stride repeats "
                              f"one element, which a saved weight never does")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= flat.numel():
        raise CheckpointError(f"{where}: tensor of size {ref.size} reaches element {last} of a storage of {flat.numel()}")
    return torch.as_strided(flat, ref.size, ref.stride, ref.offset).clone()


def _finish(obj, where: str, seen: dict | None = None):
    """Replace tensor records by tensors and EasyDicts by dicts, throughout the loaded tree."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, TensorRef):
        out = _materialize(obj, where)
    elif isinstance(obj, StorageRef):
        out = obj.data
    elif isinstance(obj, dict):
        out = {}
        seen[id(obj)] = out
        out.update({k: _finish(v, where, seen) for k, v in obj.items()})
    elif isinstance(obj, list):
        out = []
        seen[id(obj)] = out
        out.extend(_finish(v, where, seen) for v in obj)
    elif isinstance(obj, tuple):
        out = tuple(_finish(v, where, seen) for v in obj)
    elif isinstance(obj, PersistentObject):
        out = PersistentObject(obj.class_name, obj.module_src, {})
        seen[id(obj)] = out
        out.state.update(_finish(obj.state, where, seen))
    elif isinstance(obj, Record):
        out = type(obj).__new__(type(obj))
        seen[id(obj)] = out
        out.state = _finish(getattr(obj, "state", None), where, seen)
    else:
        out = obj
    seen[id(obj)] = out
    return out


def read_pickle(path: str | os.PathLike):
    """The object tree of a network pickle (plain pickle, or torch.save zip or legacy), inert.

    Tensors are materialised; persistent objects are PersistentObject records, torch containers
    Record instances. Raises CheckpointError naming the file and the first thing that does not fit.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{where} is a damaged zip archive: {exc}") from None
    if is_zip:
        try:
            tree = _read_zip(path, where)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, UnicodeDecodeError, NotImplementedError,
                EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"{where} is a damaged zip archive: {type(exc).__name__}: {exc}") from None
    else:
        # In memory: a BytesIO read never allocates more than the file holds, whatever length a
        # damaged record claims (a file object's read(n) would allocate n bytes first).
        f = io.BytesIO(path.read_bytes())
        # A legacy torch.save stream opens with the pickled magic number (protocol 2, LONG1).
        if f.getbuffer()[:3] == b"\x80\x02\x8a":
            tree = _read_legacy(f, where)
        else:
            tree = _load(f, where)
            if f.read(1):
                raise CheckpointError(f"{where} has data after its pickle")
    try:
        return _finish(tree, where)
    except RecursionError:
        raise CheckpointError(f"{where} nests its objects too deeply for a network checkpoint") from None


# --- the network inside -----------------------------------------------------------------------

@dataclass
class NetworkRecord:
    """What a network pickle holds of its `ema` network."""

    class_name: str
    init_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    module_src_sha256: str


def _module_state(obj, prefix: str, out: dict[str, torch.Tensor], where: str) -> None:
    """Parameters, persistent buffers, then submodules: the order of nn.Module.state_dict."""
    state = obj.state if isinstance(obj, (PersistentObject, Record)) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: module {prefix.rstrip('.') or '<root>'} has no state")
    skip = state.get("_non_persistent_buffers_set") or set()
    for table in ("_parameters", "_buffers"):
        entries = state.get(table, {})
        if not isinstance(entries, dict):
            raise CheckpointError(f"{where}: module {prefix.rstrip('.') or '<root>'} has a malformed {table}")
        for name, tensor in entries.items():
            if tensor is None or (table == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{where}: {prefix}{name} is {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor
    children = state.get("_modules", {})
    if not isinstance(children, dict):
        raise CheckpointError(f"{where}: module {prefix.rstrip('.') or '<root>'} has malformed submodules")
    for name, child in children.items():
        if child is not None:
            _module_state(child, f"{prefix}{name}.", out, where)


def network_of(tree, where: str, key: str = "ema") -> NetworkRecord:
    """The `key` network of a loaded NVlabs pickle: state dict, class name and init kwargs."""
    if not isinstance(tree, dict) or key not in tree:
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"{where} has no {key!r} network (found {found}); is it an NVlabs network pickle?")
    net = tree[key]
    if not isinstance(net, PersistentObject):
        raise CheckpointError(f"{where}: {key!r} is {type(net).__name__}, not an NVlabs persistent network")
    args, kwargs = net.state.get("_init_args"), net.state.get("_init_kwargs")
    if args not in (None, (), []):
        raise CheckpointError(f"{where}: {net.class_name} was built with positional arguments {args!r}; expected keywords only")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: {net.class_name} carries no init_kwargs; cannot tell its configuration")
    state: dict[str, torch.Tensor] = {}
    _module_state(net, "", state, where)
    sha = hashlib.sha256(net.module_src.encode("utf-8", "surrogatepass")).hexdigest()
    return NetworkRecord(net.class_name, dict(kwargs), state, sha)


def read_network(path: str | os.PathLike, key: str = "ema") -> NetworkRecord:
    """The `ema` network of an NVlabs pickle, read without importing or running anything."""
    return network_of(read_pickle(path), str(path), key)


__all__ = ["read_pickle", "read_network", "network_of", "NetworkRecord", "PersistentObject", "Record",
           "RestrictedUnpickler"]
