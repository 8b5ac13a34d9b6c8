"""Test setup: 8 fake CPU devices so that sharding is exercised without accelerators, and a compilation
cache shared by the tests (many compile the same tiny-config step); the `open_clip` fixture the reward tests
share."""

import importlib
import importlib.util
import os
import sys
import tempfile
import types

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "pnapo_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="module")
def open_clip():
    """open_clip, imported with stand-ins for torchvision where it is missing: open_clip imports it for image
    transforms these tests never use, and PyPI's torchvision wheels need a CUDA build of torch. The stand-ins
    leave sys.modules once open_clip is in. open_clip is not in the dev extra (its torchvision requirement
    would replace CPU torch): `.ci/run` installs it with --no-deps; a plain `pip install -e .[dev]` skips these."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip not installed: pip install --no-deps open-clip-torch==3.3.0 ftfy wcwidth")
    try:
        importlib.import_module("torchvision")
    except ImportError:
        meta = type("Placeholder", (type,), {"__getattr__": lambda cls, name: cls})
        placeholder = meta("Placeholder", (), {})
        names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
                 "torchvision.ops.misc")
        stubs = {n: types.ModuleType(n) for n in names}
        for name, module in stubs.items():
            module.__getattr__ = lambda attr: placeholder
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(stubs[parent], child, module)
        sys.modules.update(stubs)
        try:
            return importlib.import_module("open_clip")
        finally:
            for name in names:
                del sys.modules[name]
    return importlib.import_module("open_clip")
