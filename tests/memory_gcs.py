"""A gs:// stand-in: fsspec's in-memory filesystem registered for the gs and gcs protocols, so that
`etils.epath.Path("gs://bucket/...")` goes through epath's fsspec backend exactly as with gcsfs, while a path
that slips through `pathlib` or `os` lands on the local disk (as "gs:/bucket/...") where a test can see it."""

import importlib

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

_REGISTRY = importlib.import_module("fsspec.registry")._registry  # fsspec.registry names its read-only view


class MemoryGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}  # noqa: RUF012 (fsspec's MemoryFileSystem keeps its files in class attributes)
    pseudo_dirs: list = [""]  # noqa: RUF012

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs's option
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.rstrip("/")


def register() -> None:
    """The stand-in for this whole process (a command run as a subprocess)."""
    for protocol in MemoryGCS.protocol:
        fsspec.register_implementation(protocol, MemoryGCS, clobber=True)


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """An empty gs:// for the test; the test runs in tmp_path, so a local "gs:" folder there is a path that
    went through pathlib instead."""
    for protocol in MemoryGCS.protocol:
        monkeypatch.setitem(_REGISTRY, protocol, MemoryGCS)  # undone after the test
    MemoryGCS.store.clear()
    MemoryGCS.pseudo_dirs[:] = [""]
    fsspec.filesystem("gs").invalidate_cache()
    monkeypatch.chdir(tmp_path)
    yield MemoryGCS.store
    MemoryGCS.store.clear()
