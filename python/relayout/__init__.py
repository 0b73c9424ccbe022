"""relayout: PyTorch checkpoints loaded straight into JAX/Flax, MLX and NumPy layouts.

The checkpoint (``.pt``/``.pth``/``.bin`` from ``torch.save``, safetensors, sharded
folders and index files) is read through a memory map by relayout's Rust core, planned
by its rules (the ``flax``, ``nnx`` and ``mlx`` presets, plus rule files) and converted
tensor by tensor straight into the arrays it returns: one copy out of the map, on the
CPU or the GPU, with the GIL released. Nothing in a checkpoint is ever executed.

    import relayout
    variables = relayout.load_flax("resnet.pt")       # {"params": ..., "batch_stats": ...}
    y = model.apply(variables, x)
"""

from __future__ import annotations

import builtins
import json
import os
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypedDict,
    Union,
)

import numpy as np

from . import _native

if TYPE_CHECKING:
    from typing_extensions import Unpack
from ._errors import (
    Error,
    ForbiddenGlobalError,
    FormatError,
    GPUError,
    InputChangedError,
    IOError,
    MissingDependencyError,
    NoSpaceError,
    OutOfMemoryError,
    OutputExistsError,
    PlanError,
    RulesError,
    UnmatchedError,
    VerifyError,
)

__version__: str = _native.__version__

PathLike = Union[str, "os.PathLike[str]"]


class Progress(NamedTuple):
    """How far a load or conversion has got; what a ``progress=`` callable receives."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


ProgressArg = Union[bool, Callable[[Progress], object], None]
Rules = Union[PathLike, Sequence[PathLike], None]


class LoadOptions(TypedDict, total=False):
    """The keywords :func:`load_flax` and :func:`load_mlx` pass on to :func:`load`."""

    rules: Rules
    set: Optional[Mapping[str, Any]]
    dtype: Any
    device: str
    adapter: Optional[str]
    key: Optional[str]
    allow_unmatched: bool
    allow_expand: bool
    module_types: Optional[PathLike]
    expect: Optional[PathLike]
    progress: ProgressArg
    quantize: bool
    q_bits: Optional[int]
    q_group_size: Optional[int]
    q_mode: Optional[str]
    quant_predicate: Optional[str]


# The report classes below are built from the JSON of the library's report structs,
# the same text the CLI's --json prints: their fields are its keys, one for one (the
# tests compare them), and a key the library adds fails loudly here rather than
# vanishing.


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint as stored (``inspect``; ``inspect --json``'s entries)."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]
    offset: int
    bytes: int
    contiguous: bool
    shares_storage: bool
    file: str

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor (``bytes``), NumPy's name."""
        return self.bytes

    @classmethod
    def _from(cls, d: Dict[str, Any]) -> "TensorInfo":
        return cls(**{**d, "shape": tuple(d["shape"]), "strides": tuple(d["strides"])})


class Slice(NamedTuple):
    """The part of a source tensor an entry reads: ``start:start + len`` of ``axis``."""

    axis: int
    start: int
    len: int


@dataclass(frozen=True)
class PlanEntry:
    """What one output tensor is made of: ``source`` sliced along ``slice`` (axis, start,
    length) when set, its axes permuted by ``perm`` (output axis k is source axis
    ``perm[k]``), reshaped to ``target_shape`` and converted to ``dtype``; ``shard`` is
    the output file it goes to in a sharded layout; ``stack`` the sources of a stacked
    target (MoE experts), which fill its leading axis in order. A quantized weight has
    ``quantize`` (mode, bits, group_size), ``quant_config`` (its per-layer entry in
    config.json, if any) and ``outputs``, the tensors it writes (packed ``uint32`` words,
    scales, biases); ``kept_whole`` says why a weight that could be quantized was not."""

    source: str
    target: str
    source_shape: Tuple[int, ...]
    target_shape: Tuple[int, ...]
    source_dtype: str
    dtype: str
    op: str
    perm: Tuple[int, ...]
    slice: Optional[Slice]
    rule: str
    warning: Optional[str]
    bytes: int
    shard: Optional[str]
    stack: Tuple[str, ...] = ()
    quantize: Optional[Dict[str, Any]] = None
    quant_config: Optional[Dict[str, Any]] = None
    kept_whole: Optional[str] = None
    outputs: Tuple[Dict[str, Any], ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensor (``bytes``), NumPy's name."""
        return self.bytes

    @classmethod
    def _from(cls, d: Dict[str, Any]) -> "PlanEntry":
        return cls(
            **{
                **d,
                "source_shape": tuple(d["source_shape"]),
                "target_shape": tuple(d["target_shape"]),
                "perm": tuple(d["perm"]),
                "slice": None if d["slice"] is None else Slice(**d["slice"]),
                "stack": tuple(d["stack"]),
                "outputs": tuple(d["outputs"]),
            }
        )


@dataclass(frozen=True)
class Skipped:
    """A source tensor left out of the output, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class ShardInfo:
    """One output file of a sharded layout, and the worker that writes it."""

    name: str
    bytes: int
    tensors: int
    worker: Optional[int]


@dataclass(frozen=True)
class CopiedFile:
    """A file of the model folder that a folder output receives beside the weights:
    its name there, the file it comes from (links followed), its size, and whether its
    bytes are rewritten (the ``mlx-lm`` preset's ``config.json``)."""

    name: str
    source: str
    bytes: int
    rewritten: bool


@dataclass(frozen=True)
class Plan:
    """The whole mapping of a checkpoint (``plan``; ``plan --json``'s keys); ``copied``: the
    model folder's files a folder output receives; ``dtype_from``: where the output dtype
    came from when the preset took it from config.json; ``quantization``: the object a
    quantized conversion's config.json gets. ``shards``,
    ``total_size`` and ``max_workers`` are set for a sharded layout (``max_shard_size``)."""

    path: str
    sources: List[str]
    entries: List[PlanEntry]
    dropped: List[Skipped]
    unmatched: List[Skipped]
    unreachable: List[str]
    shards: Optional[List[ShardInfo]]
    total_size: Optional[int]
    max_workers: Optional[int]
    copied: List[CopiedFile]
    dtype_from: Optional[str]
    quantization: Optional[Dict[str, Any]] = None

    @property
    def rules(self) -> List[str]:
        """The preset and rule files the plan was built from (``sources``)."""
        return self.sources

    @property
    def nbytes(self) -> int:
        """Bytes of the converted tensors."""
        return sum(e.bytes for e in self.entries)

    @classmethod
    def _from(cls, d: Dict[str, Any]) -> "Plan":
        shards = d["shards"]
        return cls(
            **{
                **d,
                "entries": [PlanEntry._from(e) for e in d["entries"]],
                "dropped": [Skipped(**s) for s in d["dropped"]],
                "unmatched": [Skipped(**s) for s in d["unmatched"]],
                "shards": None if shards is None else [ShardInfo(**s) for s in shards],
                "copied": [CopiedFile(**f) for f in d["copied"]],
            }
        )


@dataclass(frozen=True)
class Report:
    """What a finished ``convert`` did (``convert --json``'s keys)."""

    input: str
    output: str
    tensors: int
    bytes: int
    seconds: float
    gb_per_s: float
    backend: str
    dropped: int
    unmatched: int
    outputs: List[str]
    reused: List[str]
    index: Optional[str]
    copied: List[str]
    shards: int
    shards_present: int
    device_upload_bytes: int
    device_readback_bytes: int


@dataclass(frozen=True)
class Mismatch:
    """A tensor on both sides of a ``verify`` with another shape or dtype."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    expected_dtype: Optional[str]
    expected_shape: Tuple[int, ...]


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found (``verify --json``'s keys): ``ok`` when every expected
    tensor is there with its shape and dtype and no other; ``report`` is the grouped
    text the CLI prints."""

    file: str
    ok: bool
    expected: int
    matched: int
    missing: List[str]
    unexpected: List[str]
    mismatched: List[Mismatch]
    report: str

    @classmethod
    def _from(cls, d: Dict[str, Any]) -> "VerifyReport":
        mismatched = [
            Mismatch(
                **{**m, "shape": tuple(m["shape"]), "expected_shape": tuple(m["expected_shape"])}
            )
            for m in d["mismatched"]
        ]
        return cls(**{**d, "mismatched": mismatched})


@dataclass(frozen=True)
class DeviceInfo:
    """A device conversions can run on (``devices``)."""

    kind: str
    name: str
    backend: str
    software: bool
    device_type: Optional[str] = None
    driver: Optional[str] = None


# safetensors dtype name -> (NumPy name, from ml_dtypes), the library's one dtype table.
_NUMPY_NAMES: Dict[str, Tuple[str, bool]] = dict(_native.dtype_names())


def numpy_dtype(name: str) -> "np.dtype[Any]":
    """The NumPy dtype of a safetensors dtype name; bfloat16 and float8, which NumPy
    lacks, come from ``ml_dtypes`` (a clear error when it is not installed)."""
    if name not in _NUMPY_NAMES:
        raise Error(f"unknown dtype {name!r}")
    numpy_name, from_ml_dtypes = _NUMPY_NAMES[name]
    dt: "np.dtype[Any]"
    if not from_ml_dtypes:
        dt = np.dtype(numpy_name)
        return dt
    try:
        import ml_dtypes
    except ImportError as e:
        raise MissingDependencyError(
            f"{name} tensors are NumPy arrays of ml_dtypes.{numpy_name}: "
            "pip install ml_dtypes (or pass dtype='float32')"
        ) from e
    dt = np.dtype(getattr(ml_dtypes, numpy_name))
    return dt


def _dtype_arg(dtype: Any) -> Optional[str]:
    """``dtype=``: a name the library parses (``"bf16"``, ``"bfloat16"``, …) or a
    NumPy/ml_dtypes dtype, passed by its NumPy name."""
    if dtype is None:
        return None
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def _fspath(p: PathLike) -> str:
    return os.fspath(p)


def _paths(p: Union[PathLike, Sequence[PathLike], None]) -> List[str]:
    if p is None:
        return []
    if isinstance(p, (str, os.PathLike)):
        return [_fspath(p)]
    return [_fspath(x) for x in p]


def _vars(v: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    return {str(k): str(x) for k, x in (v or {}).items()}


def _opt_path(p: Optional[PathLike]) -> Optional[str]:
    return None if p is None else _fspath(p)


class _Bar:
    """A progress callback for the native layer: a tqdm bar, a user callable, or both."""

    def __init__(self, progress: ProgressArg, desc: str) -> None:
        self.bar: Any = None
        self.user: Optional[Callable[[Progress], object]] = None
        if callable(progress):
            self.user = progress
        elif progress:
            try:
                from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    def __call__(self, td: int, tt: int, bd: int, bt: int) -> None:
        if self.bar is not None:
            if self.bar.total != bt:
                self.bar.total = bt
            self.bar.update(bd - self.bar.n)
            self.bar.set_postfix_str(f"{td}/{tt} tensors", refresh=False)
        if self.user is not None:
            self.user(Progress(td, tt, bd, bt))

    def native(self) -> Optional[Callable[[int, int, int, int], None]]:
        return self if (self.bar is not None or self.user is not None) else None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _options(
    preset: Optional[str],
    rules: Rules,
    set: Optional[Mapping[str, Any]],
    dtype: Any,
    device: str,
    adapter: Optional[str],
    key: Optional[str],
    allow_unmatched: bool,
    allow_expand: bool,
    module_types: Optional[PathLike],
    expect: Optional[PathLike],
    copy_files: bool = True,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: Optional[str] = None,
    quant_predicate: Optional[str] = None,
) -> "_native._Options":
    """The keywords as the native layer takes them: one dict, paths as str."""
    return {
        "preset": preset,
        "rules": _paths(rules),
        "set": _vars(set),
        "dtype": _dtype_arg(dtype),
        "device": device,
        "adapter": adapter,
        "key": key,
        "allow_unmatched": allow_unmatched,
        "allow_expand": allow_expand,
        "module_types": _opt_path(module_types),
        "expect": _opt_path(expect),
        "copy_files": copy_files,
        "quantize": quantize,
        "q_bits": q_bits,
        "q_group_size": q_group_size,
        "q_mode": q_mode,
        "quant_predicate": quant_predicate,
    }


def load(
    src: PathLike,
    preset: Optional[str],
    *,
    rules: Rules = None,
    set: Optional[Mapping[str, Any]] = None,
    dtype: Any = None,
    device: str = "auto",
    adapter: Optional[str] = None,
    key: Optional[str] = None,
    allow_unmatched: bool = False,
    allow_expand: bool = False,
    module_types: Optional[PathLike] = None,
    expect: Optional[PathLike] = None,
    progress: ProgressArg = False,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: Optional[str] = None,
    quant_predicate: Optional[str] = None,
) -> Dict[str, np.ndarray]:
    """Loads ``src`` converted by ``preset`` (and/or ``rules`` files) as
    ``{target name: numpy.ndarray}``.

    Every array is C-contiguous, writable and of the target dtype (bfloat16 and float8
    as ``ml_dtypes`` types); each tensor is converted straight into its array's buffer.
    ``set`` gives rule variables (``--set``), ``dtype`` the output dtype of every
    floating tensor (``--dtype``), ``key`` the state dict inside a training checkpoint,
    ``module_types`` and ``expect`` the CLI's files of those names. ``device`` is
    ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"reference"``. ``progress=True`` shows a tqdm
    bar (when tqdm is installed); a callable receives :class:`Progress` after every band.
    The GIL is released while converting; Ctrl-C stops the load within one band.
    ``quantize=True`` (preset ``mlx-lm``) quantizes as ``mlx_lm.convert -q`` does, with
    ``q_bits``, ``q_group_size``, ``q_mode`` and ``quant_predicate`` as its flags: a
    quantized weight ``X.weight`` comes as ``X.weight`` (``uint32``), ``X.scales`` and
    (affine) ``X.biases``.
    """
    return _load_full(
        src,
        preset,
        rules=rules,
        set=set,
        dtype=dtype,
        device=device,
        adapter=adapter,
        key=key,
        allow_unmatched=allow_unmatched,
        allow_expand=allow_expand,
        module_types=module_types,
        expect=expect,
        progress=progress,
        quantize=quantize,
        q_bits=q_bits,
        q_group_size=q_group_size,
        q_mode=q_mode,
        quant_predicate=quant_predicate,
    )[0]


def _load_full(
    src: PathLike,
    preset: Optional[str],
    *,
    rules: Rules = None,
    set: Optional[Mapping[str, Any]] = None,
    dtype: Any = None,
    device: str = "auto",
    adapter: Optional[str] = None,
    key: Optional[str] = None,
    allow_unmatched: bool = False,
    allow_expand: bool = False,
    module_types: Optional[PathLike] = None,
    expect: Optional[PathLike] = None,
    progress: ProgressArg = False,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: Optional[str] = None,
    quant_predicate: Optional[str] = None,
) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
    """:func:`load`, and the quantization config of a quantized load."""
    return _load(
        src,
        _options(
            preset, rules, set, dtype, device, adapter, key, allow_unmatched, allow_expand,
            module_types, expect, True, quantize, q_bits, q_group_size, q_mode,
            quant_predicate,
        ),
        progress,
    )


def _load(
    src: PathLike, options: "_native._Options", progress: ProgressArg
) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
    """The arrays and the quantization config of a load."""
    session = _native.Session(_fspath(src), options)
    targets = session.targets()
    dtypes = {name: numpy_dtype(name) for name in builtins.set(t[2] for t in targets)}
    _check_memory(sum(int(np.prod(shape)) * dtypes[dt].itemsize for _, shape, dt in targets), src)
    arrays = [np.empty(shape, dtype=dtypes[dt]) for _, shape, dt in targets]
    bar = _Bar(progress, "relayout load")
    try:
        session.fill(arrays, bar.native())
    finally:
        bar.close()
    quantization = session.quantization()
    return (
        {name: a for (name, _, _), a in zip(targets, arrays)},
        None if quantization is None else json.loads(quantization),
    )


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _check_memory(nbytes: int, src: PathLike) -> None:
    """Refuses, before any array exists, a load larger than the machine's memory: with
    overcommit the arrays would be handed out and the process killed half way."""
    physical = _physical_memory()
    if physical is not None and nbytes > physical:
        raise OutOfMemoryError(
            f"{_fspath(src)}: the converted tensors need {nbytes / 2**30:.1f} GiB, more than "
            f"this machine's {physical / 2**30:.1f} GiB of memory (convert to a file instead)"
        )


def _nest(flat: Mapping[str, Any], int_keys: bool) -> Dict[Any, Any]:
    tree: Dict[Any, Any] = {}
    for name, value in flat.items():
        parts: List[Any] = name.split(".")
        if int_keys:
            parts = [int(p) if p.isdigit() else p for p in parts]
        node = tree
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise PlanError(f"'{name}' nests under '{p}', which is also a tensor")
            node = child
        if parts[-1] in node:
            raise PlanError(f"'{name}' is both a tensor and a module")
        node[parts[-1]] = value
    return tree


def load_flax(
    src: PathLike,
    preset: str = "flax",
    *,
    as_jax: bool = True,
    **options: "Unpack[LoadOptions]",
) -> Dict[Any, Any]:
    """Loads ``src`` as a nested Flax variables dict, e.g. ``{"params": {...},
    "batch_stats": {...}}`` for ``model.apply(variables, x)`` (linen, preset ``flax``),
    or the pure-dict state of an NNX model (preset ``nnx``: list indices become ints,
    for ``nnx.update(model, state)``). Leaves are ``jax.Array``\\ s, or NumPy arrays
    with ``as_jax=False``. The other keywords are :func:`load`'s.
    """
    flat: Dict[str, Any] = load(src, preset, **options)
    if as_jax:
        try:
            import jax.numpy as jnp
        except ImportError as e:
            raise MissingDependencyError("as_jax=True needs jax: pip install jax") from e
        flat = {k: jnp.asarray(v) for k, v in flat.items()}
    return _nest(flat, int_keys=preset == "nnx")


class MlxWeights(Dict[str, Any]):
    """``{name: mlx.core.array}`` from :func:`load_mlx`, with ``quantization``: the
    ``quantization`` object of the model's config for a quantized load (``None``
    otherwise), what ``mlx_lm`` needs to build the quantized model before
    ``load_weights``."""

    quantization: Optional[Dict[str, Any]] = None


def load_mlx(
    src: PathLike,
    preset: str = "mlx",
    **options: "Unpack[LoadOptions]",
) -> MlxWeights:
    """Loads ``src`` as ``{name: mlx.core.array}``, ready for
    ``model.load_weights(list(weights.items()))``. The keywords are :func:`load`'s; with
    ``quantize=True`` (preset ``mlx-lm``) the weights are quantized as
    ``mlx_lm.convert -q`` quantizes them and ``weights.quantization`` holds the config's
    ``quantization`` object (for ``mlx.nn.quantize`` with a class predicate reading it,
    as ``mlx_lm.utils.load_model`` does)."""
    try:
        import mlx.core as mx
    except ImportError as e:
        raise MissingDependencyError("load_mlx needs mlx: pip install mlx") from e
    flat, quantization = _load_full(src, preset, **options)
    out = MlxWeights()
    out.quantization = quantization
    for name, a in flat.items():
        kind = a.dtype.name
        if kind == "bfloat16":
            # MLX takes the bits: same width, reinterpreted on its side.
            out[name] = mx.array(a.view(np.uint16)).view(mx.bfloat16)
        elif kind.startswith("float8"):
            raise Error(
                f"'{name}' is {kind}, which MLX arrays do not hold: pass dtype='bfloat16' "
                "or 'float16' to convert it"
            )
        else:
            out[name] = mx.array(a)
    return out


def convert(
    src: PathLike,
    dst: PathLike,
    preset: Optional[str],
    *,
    rules: Rules = None,
    set: Optional[Mapping[str, Any]] = None,
    dtype: Any = None,
    device: str = "auto",
    adapter: Optional[str] = None,
    key: Optional[str] = None,
    allow_unmatched: bool = False,
    allow_expand: bool = False,
    module_types: Optional[PathLike] = None,
    expect: Optional[PathLike] = None,
    force: bool = False,
    max_shard_size: Union[int, str, None] = None,
    copy_files: bool = True,
    progress: ProgressArg = False,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: Optional[str] = None,
    quant_predicate: Optional[str] = None,
) -> Report:
    """``relayout convert``: writes ``src`` converted to ``dst``, atomically (a failed or
    interrupted run leaves nothing). ``dst`` ending in ``.safetensors`` is one file;
    any other path is a folder of ``model-0000k-of-0000N.safetensors`` shards (one alone is
    ``model.safetensors``) of at most
    ``max_shard_size`` (bytes, or ``"5GB"``, ``"512MiB"``) with its index. The other
    keywords are :func:`load`'s; ``force`` replaces an existing output. When ``src`` is
    (or is in) a model folder holding ``config.json`` and ``dst`` is a folder, the
    folder's config, generation config, tokenizer files, ``*.py``, ``LICENSE*`` and
    ``README.md`` are written beside the weights in the same commit, unless
    ``copy_files=False``."""
    if isinstance(max_shard_size, str):
        max_shard_size = _native.parse_size(max_shard_size)
    bar = _Bar(progress, "relayout convert")
    try:
        options = _options(
            preset, rules, set, dtype, device, adapter, key, allow_unmatched, allow_expand,
            module_types, expect, copy_files, quantize, q_bits, q_group_size, q_mode,
            quant_predicate,
        )
        r = _native.convert(_fspath(src), _fspath(dst), options, force, max_shard_size, bar.native())
    finally:
        bar.close()
    return Report(**json.loads(r))


def plan(
    src: PathLike,
    preset: Optional[str],
    *,
    rules: Rules = None,
    set: Optional[Mapping[str, Any]] = None,
    dtype: Any = None,
    key: Optional[str] = None,
    allow_unmatched: bool = False,
    allow_expand: bool = False,
    module_types: Optional[PathLike] = None,
    expect: Optional[PathLike] = None,
    max_shard_size: Union[int, str, None] = None,
    shards: Optional[int] = None,
    copy_files: bool = True,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: Optional[str] = None,
    quant_predicate: Optional[str] = None,
) -> Plan:
    """What ``load``/``convert`` would do, nothing converted (``relayout plan --json``):
    every entry's source, target, shapes, dtypes, op and rule; the dropped and unmatched
    tensors; with ``max_shard_size``, the output shards (and with ``shards``, the
    worker of each); ``copied``, the model folder's files a folder output receives."""
    if isinstance(max_shard_size, str):
        max_shard_size = _native.parse_size(max_shard_size)
    options = _options(
        preset, rules, set, dtype, "cpu", None, key, allow_unmatched, allow_expand,
        module_types, expect, copy_files, quantize, q_bits, q_group_size, q_mode,
        quant_predicate,
    )
    return Plan._from(json.loads(_native.plan(_fspath(src), options, max_shard_size, shards)))


def inspect(src: PathLike, *, key: Optional[str] = None, allow_expand: bool = False) -> List[TensorInfo]:
    """The tensors of a checkpoint as stored (``relayout inspect --json``'s entries):
    name, dtype, shape, strides, offset, bytes."""
    report = json.loads(_native.inspect(_fspath(src), key, allow_expand))
    return [TensorInfo._from(t) for t in report["entries"]]


def verify(path: PathLike, expect: PathLike) -> VerifyReport:
    """``relayout verify``: compares the tensor names, shapes and dtypes of the
    checkpoint at ``path`` (only its header is read) with an expectation file (JSON
    ``{name: {"shape": [...], "dtype": ...}}``, a ``.safetensors`` or a Flax
    ``.msgpack``). Returns the report either way; check ``ok``."""
    return VerifyReport._from(json.loads(_native.verify(_fspath(path), _fspath(expect))))


def devices() -> List[DeviceInfo]:
    """The CPU, then every GPU adapter found (Vulkan, Metal, DX12)."""
    return [DeviceInfo(**d) for d in _native.devices()]


def presets() -> List[str]:
    """The built-in preset names."""
    return list(_native.presets())


__all__ = [
    "load",
    "load_flax",
    "load_mlx",
    "MlxWeights",
    "convert",
    "plan",
    "inspect",
    "verify",
    "devices",
    "presets",
    "numpy_dtype",
    "Progress",
    "LoadOptions",
    "TensorInfo",
    "PlanEntry",
    "Slice",
    "Skipped",
    "ShardInfo",
    "CopiedFile",
    "Plan",
    "Report",
    "Mismatch",
    "VerifyReport",
    "DeviceInfo",
    "Error",
    "FormatError",
    "ForbiddenGlobalError",
    "RulesError",
    "PlanError",
    "UnmatchedError",
    "VerifyError",
    "IOError",
    "OutputExistsError",
    "NoSpaceError",
    "InputChangedError",
    "GPUError",
    "OutOfMemoryError",
    "MissingDependencyError",
]
