"""A torch.save'd state dict (zip format, torch >= 1.6) read into NumPy WITHOUT unpickling.

`torch.load` runs the pickle in `data.pkl`, and a pickle can call anything. Here its opcodes are walked with
`pickletools.genops` by a small stack machine that knows only what a saved state dict uses: dicts, lists,
tuples, strings, numbers, `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` /
`_rebuild_parameter` and the typed `torch.*Storage` markers of the persistent ids that point at
`data/<key>` in the zip. Those names are matched as strings and handled by our own code; nothing is imported
or called by name. Any other global or opcode (INST, OBJ, NEWOBJ, EXT, ...) stops the read with one line
naming the file, before any tensor is built. Legacy (pre-zip) files are refused the same way.
"""

import os
import pickletools
import zipfile
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from pnapo_jax.errors import UserError

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_MARK = object()


class _Refused(Exception):
    """The pickle does something a state dict does not."""


class _Storage:
    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    """The tensor view torch's _rebuild_tensor_v2 makes (storage, offset, size, stride), copied out."""
    flat = storage.array
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= len(flat):
        raise _Refused(f"a tensor of size {size} and stride {stride} overruns its storage of {len(flat)}")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=tuple(size),
                                           strides=tuple(s * flat.itemsize for s in stride))
    return np.array(view)


def _ordered_dict(*args: Any) -> dict:
    return dict(*args)


_CALLABLES: dict[str, Callable[..., Any]] = {
    "collections OrderedDict": _ordered_dict,
    "torch._utils _rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils _rebuild_parameter": lambda tensor, *_: tensor,
}


def _global(name: str) -> Any:
    if name in _CALLABLES:
        return _CALLABLES[name]
    module, _, attr = name.partition(" ")
    if module == "torch" and attr in STORAGE_DTYPES:
        return ("storage_type", STORAGE_DTYPES[attr])
    raise _Refused(f"it names the global {name.replace(' ', '.')!r}, which a state dict does not use")


def _run(pickle_bytes: bytes, load_storage: Callable[[str, Any], _Storage]) -> Any:
    """Interpret a state-dict pickle; raises _Refused on anything outside the whitelist."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        i = max(j for j, x in enumerate(stack) if x is _MARK)
        items = stack[i + 1:]
        del stack[i:]
        return items

    for op, arg, _ in pickletools.genops(pickle_bytes):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BININT", "BININT1", "BININT2",
                    "LONG1", "BINFLOAT", "SHORT_BINSTRING", "BINSTRING", "BINBYTES", "SHORT_BINBYTES"):
            stack.append(arg)
        elif name in ("NEWTRUE", "NEWFALSE", "NONE"):
            stack.append({"NEWTRUE": True, "NEWFALSE": False, "NONE": None}[name])
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            stack[-1].update(zip(items[::2], items[1::2], strict=True))
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "GLOBAL":
            stack.append(_global(arg))
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            stack.append(_global(f"{module} {attr}"))
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if not callable(fn):
                raise _Refused(f"it calls {fn!r}, which is not a whitelisted function")
            stack.append(fn(*args))
        elif name == "BUILD":
            stack.pop()  # an OrderedDict's attributes (state_dict()'s `_metadata`): not needed
        elif name == "BINPERSID":
            pid = stack.pop()
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], tuple) and pid[1][0] == "storage_type"):
                raise _Refused(f"unexpected persistent id {pid!r}")
            stack.append(load_storage(str(pid[2]), pid[1][1]))
        elif name == "STOP":
            return stack.pop()
        else:
            raise _Refused(f"it uses the pickle opcode {name}, which a state dict does not use")
    raise _Refused("the pickle ends without STOP")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} from a zip-format torch.save of a state dict (or of a dict holding one under
    "state_dict"); anything else is one UserError naming the file. Nothing in the file is executed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a zip-format torch checkpoint (a legacy torch.save or another format); "
                        "re-save it with a current torch, or convert it to safetensors")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UserError(f"{path}: expected one <archive>/data.pkl in the zip, found {pickles}")
        prefix = pickles[0].removesuffix("data.pkl")
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise UserError(f"{path}: a big-endian checkpoint; not supported")

        def load_storage(key: str, dtype: Any) -> _Storage:
            return _Storage(np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=dtype))

        try:
            obj = _run(archive.read(pickles[0]), load_storage)
        except (_Refused, KeyError, IndexError) as e:  # a memo or stack entry the pickle never made
            raise UserError(f"{path}: not read as a state dict: {e}; refused (nothing in it was run)") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors (nor one under 'state_dict')")
    return {str(k).removeprefix("module."): v for k, v in state.items()}
