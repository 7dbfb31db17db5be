from typing import Any

MAX_DIMS: int

def describe(values: list[Any], addresses: Any, dims: Any, strides: Any, ndims: Any,
             descrs: list[Any]) -> None: ...
def match(arrays: dict[Any, Any], names: list[Any], descrs: list[Any], addresses: Any,
          dims: Any, strides: Any, ndims: Any, matched: Any, values: list[Any]) -> int: ...
