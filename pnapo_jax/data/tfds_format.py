"""The sextuple as TFDS features, and the decode of one stored record with neither TensorFlow nor pickle.

Arrays are stored as raw float32 bytes (`Encoding.BYTES`) inside the tf.Example that TFDS writes to
array_record: no pickle, no protobuf float_list of millions of values, and a read is one copy out of the
protobuf. The dataset's `metadata.json` carries its declared `SextupleSpec`; `features.json` must agree.
"""

import dataclasses
import json
import math

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from google.protobuf.message import DecodeError
from tensorflow_datasets.proto import tf_example_pb2

from pnapo_jax.data.schema import ARRAY_DTYPE, FLOAT_FIELDS, INT_FIELDS, TEXT_FIELDS, RecordError, SextupleSpec
from pnapo_jax.errors import UserError

SPEC_METADATA_KEY = "sextuple_spec"
FEATURE_CLASSES = frozenset(  # what features_of writes, named as features.json names them
    f"{cls.__module__}.{cls.__qualname__}"
    for cls in (tfds.features.FeaturesDict, tfds.features.Tensor, tfds.features.Text, tfds.features.Scalar)
)


def features_of(spec: SextupleSpec) -> tfds.features.FeaturesDict:
    """The TFDS features that hold records of `spec`."""
    arrays = {
        name: tfds.features.Tensor(shape=shape, dtype=ARRAY_DTYPE, encoding=tfds.features.Encoding.BYTES)
        for name, shape in spec.array_shapes().items()
    }
    texts = {name: tfds.features.Text() for name in TEXT_FIELDS}
    floats = {name: tfds.features.Scalar(dtype=np.float32) for name in FLOAT_FIELDS}
    ints = {name: tfds.features.Scalar(dtype=np.int64) for name in INT_FIELDS}
    return tfds.features.FeaturesDict(arrays | texts | floats | ints)


def spec_metadata(spec: SextupleSpec) -> tfds.core.MetadataDict:
    """The dataset-level metadata that declares `spec`."""
    return tfds.core.MetadataDict({SPEC_METADATA_KEY: dataclasses.asdict(spec)})


def check_features_file(path: str) -> None:
    """Refuses a features.json that names any feature class but ours, before TFDS reads it: TFDS imports the
    module of every `pythonClassName` it meets, so a crafted dataset could import any installed module."""
    file = epath.Path(path) / "features.json"  # local or gs://
    try:
        nodes = [json.loads(file.read_bytes().decode("utf-8"))]
    except FileNotFoundError:
        raise UserError(f"{file}: missing; a dataset written by pnapo_jax has one") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file}: not JSON ({error})") from None
    if not isinstance(nodes[0], dict) or "featuresDict" not in nodes[0]:
        raise UserError(f"{file}: the top level is not a features dict")
    while nodes:
        node = nodes.pop()
        name = node.get("pythonClassName") if isinstance(node, dict) else None
        if name not in FEATURE_CLASSES:
            raise UserError(f"{file}: feature class {name!r} refused; only {sorted(FEATURE_CLASSES)} are read")
        if "featuresDict" in node:
            features = node["featuresDict"].get("features") if isinstance(node["featuresDict"], dict) else None
            if not isinstance(features, dict):
                raise UserError(f"{file}: a featuresDict without its features")
            nodes += list(features.values())


def spec_of(info: tfds.core.DatasetInfo, path: str) -> SextupleSpec:
    """The spec a written dataset declares, refused with the first field where its features disagree."""
    if SPEC_METADATA_KEY not in (info.metadata or {}):
        raise RecordError(path, None, SPEC_METADATA_KEY, "metadata.json declares no sextuple spec")
    try:
        spec = SextupleSpec(**info.metadata[SPEC_METADATA_KEY])
    except TypeError as error:  # a field missing or unknown
        raise RecordError(path, None, SPEC_METADATA_KEY, f"metadata.json: {error}") from None
    declared, expected = info.features, features_of(spec)
    for name in sorted(set(declared.keys()) | set(expected.keys())):
        if name not in declared or name not in expected:
            raise RecordError(path, None, name, f"features.json and the declared {spec} disagree on this field")
        if declared[name].to_json_content() != expected[name].to_json_content():
            problem = f"features.json has {declared[name]!r}, the spec needs {expected[name]!r}"
            raise RecordError(path, None, name, problem)
    return spec


def decode_record(raw: bytes, spec: SextupleSpec, path: str, index: int) -> dict:
    """One stored tf.Example -> record dict; absent fields stay absent for `validate_record` to report."""
    try:
        feature_map = tf_example_pb2.Example.FromString(raw).features.feature
    except DecodeError as error:
        raise RecordError(path, index, None, f"{len(raw)} bytes that are not a tf.Example protobuf ({error})") from None

    def single(name: str, kind: str):
        values = getattr(feature_map[name], kind).value
        if len(values) != 1:
            raise RecordError(path, index, name, f"expected one {kind} value, found {len(values)}")
        return values[0]

    present = lambda names: [name for name in names if name in feature_map]
    record, shapes = {}, spec.array_shapes()
    for name in present(shapes):
        shape = shapes[name]
        buffer = single(name, "bytes_list")
        nbytes = math.prod(shape) * ARRAY_DTYPE.itemsize
        if len(buffer) != nbytes:
            raise RecordError(path, index, name, f"{len(buffer)} bytes, declared float32 {shape} needs {nbytes}")
        record[name] = np.frombuffer(buffer, ARRAY_DTYPE).reshape(shape)
    for name in present(TEXT_FIELDS):
        try:
            record[name] = single(name, "bytes_list").decode()
        except UnicodeDecodeError as error:
            raise RecordError(path, index, name, f"invalid UTF-8 at byte {error.start}") from None
    record |= {name: np.float32(single(name, "float_list")) for name in present(FLOAT_FIELDS)}
    record |= {name: int(single(name, "int64_list")) for name in present(INT_FIELDS)}
    return record
