"""benchmarks/machine.py's load line, which every benchmark prints before and after what it times."""

import importlib.util
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_load_is_the_1_5_15_min_averages(monkeypatch):
    spec = importlib.util.spec_from_file_location("machine", ROOT / "benchmarks" / "machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 1.25, 12.0))
    assert machine.load() == "0.50/1.25/12.00"
