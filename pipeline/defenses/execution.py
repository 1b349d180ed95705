"""How the ELBO engine (elbo.py) runs the network: the class-sharing split and the device options.

The engine needs ||eps_theta(x_t, t, y) - e_t||^2 for many (example, class, timestep). x_t and
e_t depend on (example, t) only, and so does every layer of the UNet before the class embedding
enters (models/unet.py: `shared`). A `ClassSharing` model therefore offers
`shared(x_t, t)`, computed once per (example, t) pair, and `conditional(shared, rows, y)`, run
once per evaluation; a `LinearStem` model offers the linear first layer the engine takes input
gradients at; an `AllClasses` model (the optimal one) gives every class of a pair in one call.
Other models (any eps_theta(x_t, t, y), e.g. an EDM denoiser through diffusion/denoiser.py) run
per evaluation on the shared x_t. `prepare` returns the network calls for a model.

Device options (EngineOptions): chunk size (network inputs per call), channels_last,
autocast (bf16 / fp16), torch.compile, CUDA graphs. None of them changes what is computed;
autocast changes the rounding (bench.autocast_agreement checks predictions against fp32), so
the precision it resolves to (`precision`) is a function of the job's options and the device
type alone, and every record and plan.json say which it was. On a CPU with bf16 matrix units
(AMX), bf16 autocast with torch.compile is the fast setting: eager bf16 GroupNorm is slow there,
and compilation fuses it with its neighbours; a job asks for it by name (autocast = "bf16").
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.unet import channels_last

# Input values (evaluations x channels x pixels) per network call on CPU: where the digits
# UNet's throughput peaked, with 1 thread and with 2; larger calls are slower as the
# activations of a call outgrow the caches (BENCHMARKS.md, "ELBO engine", chunk size).
CPU_CHUNK_ELEMENTS = 512 * 64

AUTOCAST = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# The name each autocast dtype goes by in records and plan.json (`precision`).
PRECISION = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs the network; none of these changes the computed quantity.

    chunk: network inputs per call (None: on CPU the cache-sized CPU_CHUNK_ELEMENTS, on GPU
    the defense's batch_size; never above batch_size). channels_last: None means on (it
    helps oneDNN convolutions on CPU and tensor cores on GPU). autocast: "auto" (bf16 on
    CUDA, float32 on a CPU), "off", "bf16" or "fp16". compile: True compiles every network call
    with torch.compile, "forward" only the calls without gradients (the logits); the first
    call of each pays the compilation. cuda_graphs: on CUDA, compile with CUDA graphs
    (torch.compile mode "reduce-overhead"); ignored on CPU.
    """

    chunk: int | None = None
    channels_last: bool | None = None
    autocast: str = "auto"
    compile: bool | str = False
    cuda_graphs: bool = False

    def __post_init__(self):
        if self.compile not in (False, True, "forward"):
            raise ConfigError(f"engine.compile must be true, false or \"forward\"; got {self.compile!r}")
        if self.chunk is not None and self.chunk < 1:
            raise ConfigError(f"engine.chunk must be >= 1, got {self.chunk}")
        if self.autocast not in ("auto", *AUTOCAST):
            raise ConfigError(f"engine.autocast must be one of auto, off, bf16, fp16; got {self.autocast!r}")


def chunk_size(options: EngineOptions, batch_size: int, x: torch.Tensor) -> int:
    """Network inputs per call for images like x (B, C, H, W): the options' chunk, else the device's."""
    if options.chunk is not None:
        return min(options.chunk, batch_size)
    if x.device.type == "cpu":
        return max(1, min(batch_size, CPU_CHUNK_ELEMENTS // max(1, x[0].numel())))
    return batch_size


def autocast_dtype(options: EngineOptions, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the options on this kind of device: "auto" is bf16 on CUDA and off
    (float32) on a CPU.

    "auto" reads nothing but the options and the device type: a CPU's bf16 rounding is only
    used when the job asks for it, so that the same job gives the same records on any CPU and
    whatever else ran on the machine before it.
    """
    name = options.autocast
    if name == "auto":
        name = "bf16" if torch.device(device).type == "cuda" else "off"
    return AUTOCAST[name]


def precision(options: EngineOptions | None, device: torch.device | str) -> str:
    """The precision the network runs in under these options on this kind of device: "float32",
    "bf16" or "fp16" (the records' `precision` column)."""
    return PRECISION[autocast_dtype(options or EngineOptions(), device)]


def autocast(options: EngineOptions, device: torch.device):
    """The autocast context of the options on this device (a null context when off)."""
    dtype = autocast_dtype(options, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def memory_format(options: EngineOptions, x: torch.Tensor) -> torch.Tensor:
    """x in the options' memory format (channels_last for 4-d tensors unless turned off)."""
    if options.channels_last is False or x.dim() != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepare(model: nn.Module, options: EngineOptions, device: torch.device, grad: bool = False) -> dict:
    """The network calls of the engine for `model`: {"shared", "conditional", "trunk"}.

    Converts the model's weights to channels_last once (same values, another layout) and,
    with `compile`, wraps the calls in torch.compile (cached per model and per kind of call,
    built on first use). Calls that take gradients (grad=True) are compiled only with
    compile=True: in float32 on CPU compiled forward-and-backward graphs are slower than eager
    ones, in bf16 faster (BENCHMARKS.md, "ELBO engine").
    """
    if options.channels_last is not False and not all(
            p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4):
        model.to(memory_format=torch.channels_last)
    calls = {"shared": shared_fn(model), "conditional": conditional_fn(model), "trunk": trunk_fn(model)}
    if not options.compile or (grad and options.compile == "forward"):
        return calls
    if grad and device.type == "cpu" and autocast_dtype(options, device) is not None:
        raise ConfigError(
            f"engine: compile = true with {options.autocast} autocast on CPU gives wrong input gradients with this "
            "torch (inductor's low-precision backward of the UNet; BENCHMARKS.md, \"The engine in bf16\"); "
            "use compile = \"forward\" (compiled logits, eager gradients) or autocast = \"off\"")
    mode = "reduce-overhead" if options.cuda_graphs and device.type == "cuda" else None
    cache = _COMPILED.setdefault(model, {})
    key = (mode, grad)
    if key not in cache:
        # Automatic dynamic shapes: the first chunk size compiles static, and the first other
        # size (a last chunk, a pruned stage) recompiles once with only the batch size symbolic.
        cache[key] = {k: torch.compile(fn, mode=mode) for k, fn in calls.items()}
    return cache[key]


# --- the network split into class-independent and class-dependent calls ----------------
@runtime_checkable
class ClassSharing(Protocol):
    """An eps-model whose class-independent work can run once per (example, t) pair:
    conditional(shared(x_t, t), rows, y) == model(x_t[rows], t[rows], y)."""

    def shared(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def conditional(self, shared: dict[str, torch.Tensor], rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LinearStem(Protocol):
    """An eps-model that starts with a linear map: model(x_t, t, y) == trunk(stem(x_t), t, y), with
    stem_adjoint the transpose of stem (gradients are taken at the stem's output)."""

    def stem(self, x_t: torch.Tensor) -> torch.Tensor: ...

    def trunk(self, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def stem_adjoint(self, g: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class AllClasses(Protocol):
    """An eps-model that gives every class of a pair in one call (the optimal model):
    all_classes(x_t (M, C, H, W), t (M,)) -> (M, K, C, H, W)."""

    def all_classes(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def shared_fn(model: nn.Module):
    """features(x_t (M, C, H, W), t (M,)) -> dict of M-row tensors free of the class."""
    if isinstance(model, ClassSharing):
        return model.shared
    return lambda x_t, t: {"x_t": x_t, "t": t}


def conditional_fn(model: nn.Module):
    """eps(features, rows (E,), y (E,)) -> (E, C, H, W): evaluation e on pair rows[e] with class y[e]."""
    if isinstance(model, ClassSharing):
        return model.conditional
    return lambda f, rows, y: model(f["x_t"].index_select(0, rows), f["t"].index_select(0, rows), y)


def trunk_fn(model: nn.Module):
    """eps(h (E, ...), t (E,), y (E,)) after the stem: h is stem(x_t) for the UNet, x_t itself otherwise."""
    return model.trunk if isinstance(model, LinearStem) else model


def stem(model: nn.Module, x_t: torch.Tensor) -> torch.Tensor:
    """The linear map the engine differentiates per evaluation through: the UNet's stem, else the identity."""
    return model.stem(x_t) if isinstance(model, LinearStem) else x_t


def stem_adjoint(model: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """The transpose of `stem` applied to g."""
    return model.stem_adjoint(g) if isinstance(model, LinearStem) else g


def flat_rows(g: torch.Tensor):
    """g (E, ...) as a (E, n) view in its own memory order, and the map back to g's shape and layout.

    Row sums (index_add_) over the flat rows run several times faster than over a
    channels_last 4-d tensor, whose rows are not contiguous in the logical order.
    """
    if channels_last(g):
        _, C, H, W = g.shape
        return g.permute(0, 2, 3, 1).reshape(g.shape[0], -1), lambda f: f.view(-1, H, W, C).permute(0, 3, 1, 2)
    shape = tuple(g.shape[1:])
    return g.reshape(g.shape[0], -1), lambda f: f.view(-1, *shape)
