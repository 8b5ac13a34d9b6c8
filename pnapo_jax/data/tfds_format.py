"""The sextuple as TFDS features, and the decode of one stored record with neither TensorFlow nor pickle.

Arrays are stored as raw float32 bytes (`Encoding.BYTES`) inside the tf.Example that TFDS writes to
array_record: no pickle, no protobuf float_list of millions of values, and a read is one copy out of the
protobuf. The dataset's `metadata.json` carries its declared `SextupleSpec`; `features.json` must agree.
"""

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from pnapo_jax.data.schema import ARRAY_DTYPE, FLOAT_FIELDS, INT_FIELDS, TEXT_FIELDS, RecordError, SextupleSpec

SPEC_METADATA_KEY = "sextuple_spec"


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


def spec_of(info: tfds.core.DatasetInfo, path: str) -> SextupleSpec:
    """The spec a written dataset declares, refused with the first field where its features disagree."""
    if SPEC_METADATA_KEY not in (info.metadata or {}):
        raise RecordError(path, None, SPEC_METADATA_KEY, "metadata.json declares no sextuple spec")
    spec = SextupleSpec(**info.metadata[SPEC_METADATA_KEY])
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
    feature_map = tf_example_pb2.Example.FromString(raw).features.feature

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
    record |= {name: single(name, "bytes_list").decode() for name in present(TEXT_FIELDS)}
    record |= {name: np.float32(single(name, "float_list")) for name in present(FLOAT_FIELDS)}
    record |= {name: int(single(name, "int64_list")) for name in present(INT_FIELDS)}
    return record
