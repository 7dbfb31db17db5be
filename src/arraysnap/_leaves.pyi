from typing import Any

FIELDS: tuple[str, ...]

def parse_rows(rows: list[Any], layouts: list[Any], packs: list[bytes], check_name: Any,
               where_from_json: Any, entry_type: type, digest_bytes: int,
               location_type: type, max_offset: int, result: list[Any]) -> None: ...
def parse_columns(names: list[Any], layout_of: list[Any], layouts: list[Any], digests: bytes,
                  where: bytes, blocks: list[Any], packs: list[bytes], entry_type: type,
                  digest_bytes: int, location_type: type, max_offset: int,
                  result: list[Any]) -> None: ...
def add_entries(items: list[Any], entries: dict[str, Any], last: str | None,
                blocks_of: Any) -> tuple[str | None, str | None]: ...
