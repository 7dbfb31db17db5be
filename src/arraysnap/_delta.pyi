from typing import Any

def scan_and_copy(
    live: Any, baseline: Any, segment_bytes: int, chunk_bytes: int, candidates: Any,
    changed: Any, copy: bool = True
) -> int: ...

def compare_many(live: Any, baseline: Any, nbytes: Any, which: Any, changed: Any,
                 copy: bool = True) -> int: ...
