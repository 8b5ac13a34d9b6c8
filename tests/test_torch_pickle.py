"""convert/torch_pickle.py: a torch.save'd state dict read back exactly without unpickling, and pickles that would
run code refused with one line before anything runs."""

import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch

from pnapo_jax.convert import torch_pickle
from pnapo_jax.errors import UserError


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    state = model.state_dict()  # an OrderedDict with `_metadata` (pickled with BUILD)
    base = torch.arange(24.0).reshape(4, 6)
    state |= {"view_T": base.T[1:], "view_slice": base[1:, 2:5], "same_storage": base,
              "bf16": torch.randn(3, 2).to(torch.bfloat16), "fp16": torch.randn(5).half(),
              "f64": torch.randn(2, 2).double(),
              "int64": torch.tensor([1, -2, 3]), "int32": torch.tensor([7], dtype=torch.int32),
              "uint8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False]),
              "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
              "param": torch.nn.Parameter(torch.randn(2, 3))}
    return state


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def test_state_dict_read_exactly(tmp_path):
    state = _state_dict()
    torch.save(state, tmp_path / "sd.pt")
    out = torch_pickle.load_state_dict(tmp_path / "sd.pt")
    assert list(out) == list(state)
    for key, tensor in state.items():
        got = out[key].astype(np.float32) if tensor.dtype == torch.bfloat16 else out[key]
        ref = _as_numpy(tensor)
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        np.testing.assert_array_equal(got, ref, err_msg=key)


def test_nested_state_dict_and_module_prefix(tmp_path):
    torch.save({"state_dict": {"module.w": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.pt")
    out = torch_pickle.load_state_dict(tmp_path / "ckpt.pt")
    assert list(out) == ["w"] and out["w"].tolist() == [1.0, 1.0]


class _Payload:
    """Unpickling this runs `touch MARKER`: what torch.load(weights_only=False) of a hostile file would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "hook": _Payload(marker)}, path)
    assert b"system" in zipfile.ZipFile(path).read("evil/data.pkl")  # the payload is really in there
    with pytest.raises(UserError, match=r"evil\.pt: not read as a state dict: it names the global "
                                        r"'(posix|os|nt)\.system'.*refused \(nothing in it was run\)"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


class Plain:
    pass


def test_other_globals_and_formats_are_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"w": torch.ones(1), "obj": Plain()}, path)  # an object of a class of this module
    with pytest.raises(UserError, match=r"obj\.pt: not read as a state dict: it names the global "
                                        r"'(copyreg|test_torch_pickle)\."):
        torch_pickle.load_state_dict(path)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(UserError, match="legacy.pt is not a zip-format torch checkpoint"):
        torch_pickle.load_state_dict(legacy)
    torch.save({"w": [1.0, 2.0]}, tmp_path / "lists.pt")
    with pytest.raises(UserError, match="lists.pt holds no state dict of tensors"):
        torch_pickle.load_state_dict(tmp_path / "lists.pt")
    with pytest.raises(UserError, match="missing.pt: file not found"):
        torch_pickle.load_state_dict(tmp_path / "missing.pt")


def test_an_inst_opcode_is_refused(tmp_path):
    """INST imports and calls in one opcode (protocol 0); a zip made by hand around it."""
    marker = tmp_path / "ran"
    path = tmp_path / "inst.pt"
    with zipfile.ZipFile(path, "w") as archive:
        command = f"touch {marker}".encode()
        archive.writestr("inst/data.pkl", b"(X" + len(command).to_bytes(4, "little") + command + b"ios\nsystem\n.")
    with pytest.raises(UserError, match=r"inst\.pt: not read as a state dict: it uses the pickle opcode INST"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()
