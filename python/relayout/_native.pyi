"""Type stubs of the Rust extension (python/src/lib.rs); use the `relayout` functions."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypedDict

__version__: str

_Progress = Optional[Callable[[int, int, int, int], object]]

class _Options(TypedDict):
    preset: Optional[str]
    rules: List[str]
    set: Dict[str, str]
    dtype: Optional[str]
    device: str
    adapter: Optional[str]
    key: Optional[str]
    allow_unmatched: bool
    allow_expand: bool
    module_types: Optional[str]
    expect: Optional[str]
    copy_files: bool
    quantize: bool
    q_bits: Optional[int]
    q_group_size: Optional[int]
    q_mode: Optional[str]
    quant_predicate: Optional[str]

class Session:
    def __init__(self, src: str, options: _Options) -> None: ...
    def targets(self) -> List[Tuple[str, Tuple[int, ...], str]]: ...
    @property
    def backend(self) -> str: ...
    def fill(self, arrays: Sequence[Any], progress: _Progress = None) -> None: ...
    def quantization(self) -> Optional[str]: ...

# The reports are JSON text of the library's report structs (the CLI's --json).
def plan(
    src: str,
    options: _Options,
    max_shard_size: Optional[int] = None,
    shards: Optional[int] = None,
) -> str: ...
def inspect(src: str, key: Optional[str] = None, allow_expand: bool = False) -> str: ...
def verify(path: str, expect: str) -> str: ...
def dtype_names() -> Dict[str, Tuple[str, bool]]: ...
def convert(
    src: str,
    dst: str,
    options: _Options,
    force: bool,
    max_shard_size: Optional[int],
    progress: _Progress = None,
) -> str: ...
def devices() -> List[Dict[str, Any]]: ...
def presets() -> List[str]: ...
def parse_size(text: str) -> int: ...
