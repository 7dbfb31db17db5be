"""Where a store's bytes live: the :class:`Storage` interface and its implementations.

>>> import tempfile
>>> from arraysnap.storage import LocalStorage, Storage
>>> isinstance(LocalStorage(tempfile.mkdtemp()), Storage)
True
"""

from ._abc import DEFAULT_GET_LIMIT, Storage, WriterLock, parse_key
from ._local import LocalStorage
from ._object import ObjectStorage
from ._wrapper import LoggingStorage, WrapperStorage

__all__ = ["DEFAULT_GET_LIMIT", "LocalStorage", "LoggingStorage", "ObjectStorage", "Storage",
           "WrapperStorage", "WriterLock", "parse_key"]
