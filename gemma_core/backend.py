"""What a backend provides, and the lazy registry that finds backends by name.

A backend realises the op vocabulary of `gemma_core.graph` once for its framework and decides how
weights are placed. Built-in backends live in the top-level `backends` package; third-party ones
register an object under the entry-point group `gemma_core.backends`. Nothing is imported until a
backend is asked for, and several backends can be used in one process. `"<name>:<variant>"`
names a variant a backend offers (`Backend.variant`), e.g. `"array_api:torch"`. The contract of
every method and attribute: docs/backends.md.
"""

from __future__ import annotations

import abc
import copy
import importlib
import os
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.errors import BackendError
from gemma_core.opset import OP_GROUPS, REQUIRED_GROUPS
from gemma_core.quant import SCALE_SUFFIX, QuantConfig

ENTRY_POINT_GROUP = "gemma_core.backends"
StepFn = Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]]
DEFAULT_BACKEND = "numpy"

# name -> "module:attribute" of the backend object.
BUILTIN_BACKENDS: dict[str, str] = {
    "numpy": "backends.numpy:backend",
    "torch": "backends.torch:backend",
    "jax": "backends.jax:backend",
    "tensorflow": "backends.tensorflow:backend",
    "array_api": "backends.array_api:backend",  # array-api-strict; other namespaces: docs/backends.md
}
# Frameworks a backend may need, with the extra that installs each.
_INSTALL_HINTS = {
    "torch": "pip install 'gemma-core[torch]'",
    "jax": "pip install 'gemma-core[jax]'",
    "jaxlib": "pip install 'gemma-core[jax]'",
    "tensorflow": "pip install 'gemma-core[tensorflow]'",
    "keras": "pip install 'gemma-core[tensorflow]'",
    "ml_dtypes": "pip install ml_dtypes",
    "array_api_compat": "pip install 'gemma-core[array-api]'",
    "array_api_strict": "pip install 'gemma-core[array-api]'",
}
# Numerics rule 9, a gap of every backend that declares float16: gemma_core refuses float16 for
# Gemma 2 and 3 (unless allowed), so their model cases do not run in float16.
FLOAT16_REFUSED: tuple[tuple[str, str, str], ...] = (
    ("arch:gemma2", "float16", "refused: Gemma 2 activations exceed float16's range (numerics rule 9)"),
    ("arch:gemma3", "float16", "refused: Gemma 3 activations exceed float16's range (numerics rule 9)"),
)


class Backend(abc.ABC):
    """A realisation of the op vocabulary for one array library."""

    name: str
    dtypes: tuple[str, ...]
    # Run projections that share an input (q/k/v, gate/up) as one product over stacked weights
    # (gemma_core.graph.fuse_projections): fewer kernel launches for eager and compiled steps.
    fuse_projections: bool = False
    # Whether the step writes the cache buffers it is given in place, or donates them (so the
    # caller's cache changes or dies): `Model.forward` then runs on `copy_cache_layer` copies
    # unless the caller hands its cache over. False for a functional step (new arrays out).
    cache_in_place: bool = True
    # What the backend supports, read by `gemma conformance` (a case needing anything undeclared is
    # skipped as not supported). `op_groups`: the groups of `gemma_core.opset.OP_GROUPS` its op
    # table implements ("core" is required and always implied); `devices`: the device kinds (the
    # part of a device string before any ":") it runs on; `gaps`: rows of `known_gaps()`.
    op_groups: tuple[str, ...] = tuple(OP_GROUPS)
    devices: tuple[str, ...] = ("cpu",)
    gaps: tuple[tuple[str, str, str], ...] = ()
    # The variants `get_backend("<name>:<variant>")` knows to offer (`variant`), for messages.
    variants: tuple[str, ...] = ()
    # Whether `save_prepared` / `load_prepared` keep prepared weights in a file mapped by the
    # next load (gemma_core.prepared_cache).
    saves_prepared: bool = False

    def variant(self, name: str) -> Backend:
        """The backend `get_backend("<self.name>:<name>")` gives: this backend in another
        configuration (the Array-API backend on another namespace). By default there are none."""
        raise BackendError(unknown_variant(self.name, name, self.variants))

    def known_gaps(self) -> list[tuple[str, str, str]]:
        """(case glob or "arch:<architecture>", dtype or "*", reason) rows: cases the conformance
        runner skips for this backend, with the reason. By default the `gaps` attribute."""
        return [tuple(row) for row in self.gaps]  # type: ignore[misc]

    def framework_version(self) -> str:
        """The version of the framework the backend runs on (keys derived caches)."""
        return ""

    def save_prepared(self, path: Path, key: str, weights: dict[str, Any]) -> None:
        """Write `key` and the prepared `weights` to `path` (where `saves_prepared`)."""
        raise NotImplementedError(f"backend {self.name!r} does not save prepared weights")

    def load_prepared(self, path: Path) -> tuple[Any, Any]:
        """(key, weights) as `save_prepared` wrote them, the arrays mapped from `path`."""
        raise NotImplementedError(f"backend {self.name!r} does not save prepared weights")

    def array_signature(self, x: Any) -> tuple[tuple[int, ...], str]:
        """(shape, dtype name) of a backend array."""
        return tuple(x.shape), str(x.dtype)

    def supports_device(self, device: str | None) -> bool:
        """Whether `device` (None: the backend's default) is of a kind in `devices`."""
        return device is None or device.lower().partition(":")[0] in self.devices

    def supported_groups(self) -> tuple[str, ...]:
        """The declared op groups, with the required ones."""
        return tuple(g for g in OP_GROUPS if g in REQUIRED_GROUPS or g in self.op_groups)

    @abc.abstractmethod
    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        """The op kinds of the declared `op_groups` (gemma_core.opset), computing in `dtype`."""

    @abc.abstractmethod
    def convert_weight(self, w: np.ndarray, dtype: str, device: str | None) -> Any:
        """One float host array as a backend array in `dtype` on `device`."""

    def op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        """`make_op_table(dtype)`, built once per dtype."""
        tables = self.__dict__.setdefault("_op_tables", {})
        if dtype not in tables:
            tables[dtype] = self.make_op_table(dtype)
        return tables[dtype]

    def prepare_weights(self, weights: Mapping[str, np.ndarray], dtype: str,
                        device: str | None, quant: QuantConfig | None = None) -> dict[str, Any]:
        """Convert canonical numpy weights to backend arrays, each distinct array once, so a
        tied tensor stays one backend array. Under `quant`, a tensor it stores quantised and its
        `<name>_scale` are converted together by `prepare_quantized`."""
        converted: dict[int, Any] = {}
        out = {}
        for name, w in weights.items():
            scheme = quant.scheme_for(name) if quant is not None else None
            if quant is not None and scheme is not None and name + SCALE_SUFFIX in weights:
                if id(w) not in converted:
                    scale = np.asarray(weights[name + SCALE_SUFFIX])
                    converted[id(w)] = self.prepare_quantized(np.asarray(w), scale, scheme,
                                                              quant.group_for(scheme), dtype, device, name)
                out[name], out[name + SCALE_SUFFIX] = converted[id(w)]
            elif name not in out:
                if id(w) not in converted:
                    converted[id(w)] = self.convert_weight(np.asarray(w), dtype, device)
                out[name] = converted[id(w)]
        return out

    def prepare_quantized(self, values: np.ndarray, scale: np.ndarray, scheme: str,
                          group_size: int | None, dtype: str, device: str | None,
                          name: str = "") -> tuple[Any, Any]:
        """One quantised weight `name` (gemma_core.quant layout) as the pair of backend objects
        this backend's `qlinear` and `qembed` read. By default: the integer values as they are,
        the scale in float32."""
        return self.asarray(values, device), self.convert_weight(scale, "float32", device)

    @abc.abstractmethod
    def asarray(self, x: np.ndarray, device: str | None) -> Any:
        """A host integer or boolean array (ids, positions, masks) on the backend."""

    @abc.abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """Any backend array as numpy; float dtypes narrower than float32 become float32."""

    def greedy_tokens(self, logits: Any) -> np.ndarray:
        """Each row's argmax over the vocabulary at the last position of `logits [B, T, V]`, as
        host int64 `[B]`, ties to the lowest id (numpy's rule), over the logits as float32 (as
        transformers' generate casts them; float64 near-ties may round together). Backends
        override this to reduce on the device, so greedy decoding moves B ids to the host
        instead of B x V floats."""
        return self.to_numpy(logits)[:, -1].astype(np.float32).argmax(axis=-1).astype(np.int64)

    @abc.abstractmethod
    def new_cache_layer(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                        dtype: str, device: str | None) -> Any:
        """An empty static cache layer of `capacity` slots."""

    @abc.abstractmethod
    def export_cache_layer(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        """The layer's (keys, values) slot buffers `[B, K, capacity, H]` as numpy."""

    def copy_cache_layer(self, state: Any) -> Any:
        """An independent copy of a cache layer (new buffers, same contents and placement);
        by default `copy.deepcopy`."""
        return copy.deepcopy(state)

    def mutates_cache(self, options: Mapping[str, Any]) -> bool:
        """Whether the step under `options` changes or frees the cache layers passed to it (by
        default `cache_in_place`); if so, `Model.forward` copies a caller's cache first."""
        return self.cache_in_place

    def static_shapes(self, options: Mapping[str, Any]) -> bool:
        """Whether the step is compiled per input shape (generation then buckets prompts)."""
        return bool(options.get("compile"))

    def compile_step(self, step: StepFn, options: Mapping[str, Any]) -> StepFn:
        """Wrap the whole forward step for this framework's compiler; by default run it as is.

        `step(weights, env) -> outputs` runs the op list; `options` come from
        `load(..., compile=..., device=...)` (compile None means the backend's default).
        """
        if options.get("compile"):
            raise BackendError(f"backend {self.name!r} has no compiled mode")
        return step


def per_weights(make: Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
    """`make(weights)` once per weight set (a compiled step that captures its weights rather
    than taking them as arguments), kept with the weights so their id stays theirs."""
    made: dict[int, tuple[Mapping[str, Any], Any]] = {}

    def get(weights: Mapping[str, Any]) -> Any:
        if id(weights) not in made:
            made[id(weights)] = (weights, make(weights))
        return made[id(weights)][1]

    return get


def unknown_variant(backend: str, variant: str, known: tuple[str, ...], more: str = "") -> str:
    """The message of a variant `backend` does not offer, listing the `known` ones."""
    listed = ", ".join(known) if known else "none"
    return f"backend {backend!r} has no variant {variant!r} (known: {listed}{more})"


def default_backend_name() -> str:
    """`GEMMA_BACKEND` if set, else numpy. An explicit argument always wins over this."""
    return os.environ.get("GEMMA_BACKEND") or DEFAULT_BACKEND


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_backends() -> list[str]:
    """Every backend name that can be asked for: built-in and registered plugins."""
    return sorted(set(BUILTIN_BACKENDS) | set(_entry_points()))


_LOADED: dict[str, Backend] = {}


def installed_backends() -> list[str]:
    """The known backends whose frameworks import here (each is loaded to find out)."""
    names = []
    for name in known_backends():
        try:
            get_backend(name)
        except BackendError:
            continue
        names.append(name)
    return names


def _import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _not_installed(name: str, e: ModuleNotFoundError) -> BackendError:
    """Backend `name` needs the missing module of `e`: one line naming what to install."""
    module = (e.name or "").split(".")[0]
    hint = _INSTALL_HINTS.get(module, f"pip install {module}")
    return BackendError(f"backend {name!r} needs {e.name}, which is not installed: {hint}")


def _load(name: str) -> Backend:
    """Import the backend registered as `name` (built in, or an entry point)."""
    try:
        if name in BUILTIN_BACKENDS:
            backend = _import_target(BUILTIN_BACKENDS[name])
        else:
            eps = _entry_points()
            if name not in eps:
                raise BackendError(
                    f"unknown backend {name!r} (known: {', '.join(known_backends())})"
                )
            backend = eps[name].load()
    except ModuleNotFoundError as e:
        if _INSTALL_HINTS.get((e.name or "").split(".")[0]) is None:
            raise  # not a framework: a bug of the backend's own package, shown as it is
        raise _not_installed(name, e) from None
    if callable(backend) and not isinstance(backend, Backend):
        backend = backend()
    return backend


def get_backend(name: str | None = None) -> Backend:
    """The backend called `name` (default: `default_backend_name()`), imported on first use.

    `"<name>:<variant>"` (e.g. `"array_api:torch"`) is `get_backend(name).variant(variant)`,
    unless a backend is registered under the whole string (which then wins)."""
    name = name or default_backend_name()
    if name in _LOADED:
        return _LOADED[name]
    base, colon, variant = name.partition(":")
    if colon and name not in BUILTIN_BACKENDS and name not in _entry_points():
        parent = get_backend(base)
        offer = getattr(parent, "variant", None)
        if offer is None:  # a plugin object that is not a `Backend` subclass
            raise BackendError(unknown_variant(base, variant, ()))
        try:
            backend = offer(variant)
        except ModuleNotFoundError as e:  # a known variant whose framework is not installed
            raise _not_installed(name, e) from None
    else:
        backend = _load(name)
    _LOADED[name] = backend
    return backend


class BackendChoices(list[str]):
    """`known_backends()` as the CLI's `--backend` choices: a known name, or `name:variant` of
    one (the variant is checked when the backend loads, by `get_backend`)."""

    def __init__(self) -> None:
        super().__init__(known_backends())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return list.__contains__(self, name) or list.__contains__(self, name.partition(":")[0])
