"""Documentation cannot rot: every docstring example and every docs code block runs."""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
from pathlib import Path

import pytest
from conftest import REPO

import arraysnap

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(arraysnap.__path__, "arraysnap.")
    if name not in ("arraysnap.__main__",)
)
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    if module_name == "arraysnap.testing._forgetting":
        from arraysnap.testing.powerloss import fuse_unavailable
        if fuse_unavailable() is not None:  # it is the FUSE file system itself
            pytest.skip(str(fuse_unavailable()))
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0


def test_every_public_name_has_an_example():
    public = [getattr(arraysnap, name) for name in arraysnap.__all__]
    public += [getattr(arraysnap.Store, name) for name in dir(arraysnap.Store)
               if not name.startswith("_")]
    for obj in public:
        if callable(obj):
            assert obj.__doc__ and ">>>" in obj.__doc__, f"{obj} has no runnable example"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_document_code_blocks_run(document: Path, tmp_path, monkeypatch):
    blocks = FENCE.findall(document.read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, f"{document.name}", "exec"), namespace)  # noqa: S102
    assert os.getcwd() == str(tmp_path)
