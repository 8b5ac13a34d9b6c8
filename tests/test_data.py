"""Sextuple records: write/read exactness, validation errors, the grain loader, resume, global batches, import."""

import glob
import json
import os
import sys

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tensorflow_datasets.proto import tf_example_pb2

from pnapo_jax.data import import_pairs
from pnapo_jax.data.batch import BATCH_KEYS, NOISE_KEYS
from pnapo_jax.data.builder import write_dataset
from pnapo_jax.data.pipeline import LoaderConfig, global_batch, make_loader
from pnapo_jax.data.schema import RecordError, SextupleSpec, check_noise_mode, validate_record
from pnapo_jax.data.source import ArrayRecordSource, open_source
from pnapo_jax.data.synthetic import synthetic_pairs
from pnapo_jax.errors import UserError

DIMS = dict(image_tokens=16, channels=8, text_len=4, text_dim=6, pooled_dim=5)
NUM = 12
ONE_HOST = grain.sharding.NoSharding()


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_pairs(NUM, **DIMS, seed=0)


@pytest.fixture(scope="module")
def dataset(synthetic, tmp_path_factory):
    return write_dataset(synthetic.records, synthetic.spec, str(tmp_path_factory.mktemp("pairs")))


def _rows(batches, key="x0_w"):
    """The record identities in a stream of batches: each x0_w is unique to its record."""
    return [row.tobytes() for batch in batches for row in batch[key]]


def _index_of(synthetic):
    return {record["x0_w"].tobytes(): index for index, record in enumerate(synthetic.records)}


def _assert_same_record(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
        else:
            assert type(got[key]) is type(value) and got[key] == value, key


def _loader(source, noise_mode="recorded", shard=ONE_HOST, **cfg):
    return make_loader(source, LoaderConfig(**{"global_batch_size": 4, "seed": 3} | cfg), noise_mode, shard)


# --- write, then read back exactly ---


def test_write_read_exact_through_builder_and_pipeline(synthetic, dataset):
    assert dataset.written == NUM and dataset.skipped == 0
    source = ArrayRecordSource(dataset.path)
    assert source.spec == synthetic.spec and len(source) == NUM
    for index, want in enumerate(synthetic.records):
        _assert_same_record(source[index], want)

    # Plain TFDS reads the same dataset by name, decoded, with no TensorFlow anywhere.
    data_dir = os.path.dirname(os.path.dirname(dataset.path))
    plain = tfds.data_source("pnapo_pairs", data_dir=data_dir, split="train")
    for index, want in enumerate(synthetic.records):
        got = plain[index]
        assert got["prompt"].decode() == want["prompt"] and got["seed_w"] == want["seed_w"]
        assert all(np.array_equal(got[key], want[key]) for key in synthetic.spec.array_shapes())
    assert "tensorflow" not in sys.modules

    batches = list(_loader(source, num_epochs=1))
    assert len(batches) == NUM // 4 and set(batches[0]) == set(BATCH_KEYS)
    assert batches[0]["x0_w"].shape == (4, 16, 8) and batches[0]["reward_gap"].shape == (4,)
    index_of = _index_of(synthetic)
    for batch in batches:
        for row, x0_w in enumerate(batch["x0_w"]):
            want = synthetic.records[index_of[x0_w.tobytes()]]
            for key in BATCH_KEYS:
                assert np.array_equal(batch[key][row], np.float32(want[key])), key
    assert sorted(index_of[row] for row in _rows(batches)) == list(range(NUM))


def test_existing_dataset_is_not_overwritten(synthetic, dataset):
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        write_dataset(synthetic.records, synthetic.spec, os.path.dirname(os.path.dirname(dataset.path)))


# --- validation on write ---


def _with_nan(array):
    array = array.copy()
    array.flat[5] = np.nan
    return array


BREAKAGES = {  # kind: (field, broken value from the record, words of the error)
    "nan": ("x0_l", lambda r: _with_nan(r["x0_l"]), "1 non-finite"),
    "shape": ("prompt_embeds", lambda r: np.zeros((5, 6), np.float32), "shape (5, 6), declared (4, 6)"),
    "dtype": ("x1_l", lambda r: r["x1_l"].astype(np.float64), "dtype float64, declared float32"),
    "missing_noise": ("x1_w", lambda r: None, "missing prior noise"),
    "reward_order": ("reward_w", lambda r: np.float32(-1.0), "below loser reward"),
    "inf_reward": ("reward_l", lambda r: np.float32(np.inf), "finite"),
    "gap": ("reward_gap", lambda r: np.float32(9.0), "reward_w - reward_l"),
}


def _broken(record, kind):
    field, value, _ = BREAKAGES[kind]
    return dict(record) | {field: value(record)}


@pytest.mark.parametrize("kind", list(BREAKAGES))
def test_write_refuses_bad_record_naming_file_record_field(synthetic, tmp_path, kind):
    field, _, problem = BREAKAGES[kind]
    records = list(synthetic.records)
    records[5] = _broken(records[5], kind)
    with pytest.raises(RecordError) as error:
        write_dataset(records, synthetic.spec, str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and problem in message
    assert message.startswith(f"{tmp_path}/pnapo_pairs/1.0.0: record 5: field {field!r}")
    assert (error.value.index, error.value.field) == (5, field)


def test_write_skip_mode_counts(synthetic, tmp_path):
    records = list(synthetic.records)
    records[2], records[7] = _broken(records[2], "nan"), _broken(records[7], "missing_noise")
    report = write_dataset(records, synthetic.spec, str(tmp_path), on_bad_record="skip")
    assert (report.written, report.skipped) == (NUM - 2, 2)
    source = ArrayRecordSource(report.path)
    _assert_same_record(source[2], synthetic.records[3])  # order kept, bad records left out


def test_spec_checks_height_width_and_unexpected_noise(synthetic):
    record = dict(synthetic.records[0], width=synthetic.records[0]["width"] * 2)
    with pytest.raises(RecordError, match="field 'height'"):
        validate_record(record, synthetic.spec, "f", 0)
    no_noise = SextupleSpec(**DIMS, has_noise=False)
    with pytest.raises(RecordError, match="field 'x1_w': noise given"):
        validate_record(synthetic.records[0], no_noise, "f", 0)


# --- validation on read ---


def _rewrite_raw(path, edits):
    """Rewrites the dataset's one shard with raw record edits {index: fn(bytes) -> bytes} (a corrupt writer)."""
    (shard,) = glob.glob(os.path.join(path, "*.array_record-*"))
    reader = array_record_module.ArrayRecordReader(shard)
    raws = reader.read_all()
    reader.close()
    writer = array_record_module.ArrayRecordWriter(shard, "group_size:1,uncompressed")  # bytes findable
    for index, raw in enumerate(raws):
        writer.write(edits[index](raw) if index in edits else raw)
    writer.close()
    return shard


def _rewrite_shard(path, edits):
    """Rewrites the dataset's one shard with tf.Example edits {index: fn(feature_map)}."""

    def edit_example(edit):
        def edit_raw(raw):
            example = tf_example_pb2.Example.FromString(raw)
            edit(example.features.feature)
            return example.SerializeToString()

        return edit_raw

    return _rewrite_raw(path, {index: edit_example(edit) for index, edit in edits.items()})


def _nan_into(name):
    def edit(feature_map):
        array = np.frombuffer(feature_map[name].bytes_list.value[0], np.float32).copy()
        array[0] = np.nan
        feature_map[name].bytes_list.value[0] = array.tobytes()

    return edit


READ_BREAKAGES = {
    1: ("x0_l", _nan_into("x0_l"), "non-finite"),
    4: ("x1_w", lambda fm: fm.pop("x1_w"), "missing prior noise"),
    6: ("prompt_embeds", lambda fm: fm["prompt_embeds"].bytes_list.value.__setitem__(0, b"\0" * 8), "8 bytes"),
    9: ("reward_w", lambda fm: fm["reward_w"].float_list.value.__setitem__(0, -5.0), "below loser reward"),
    10: ("seed_w", lambda fm: fm["seed_w"].ClearField("int64_list"), "expected one int64_list value"),
}


@pytest.fixture
def corrupt_dataset(synthetic, tmp_path):
    report = write_dataset(synthetic.records, synthetic.spec, str(tmp_path))
    shard = _rewrite_shard(report.path, {index: edit for index, (_, edit, _) in READ_BREAKAGES.items()})
    return report.path, shard


def test_read_names_file_record_field(corrupt_dataset):
    path, shard = corrupt_dataset
    source = ArrayRecordSource(path)
    for index, (field, _, problem) in READ_BREAKAGES.items():
        with pytest.raises(RecordError) as error:
            source[index]
        assert str(error.value).startswith(f"{shard}: record {index}: field {field!r}: ")
        assert problem in str(error.value) and "\n" not in str(error.value)


def test_loader_raises_or_skips_and_counts(synthetic, corrupt_dataset):
    source = ArrayRecordSource(corrupt_dataset[0])
    with pytest.raises(RecordError, match=r"record \d+: field"):
        list(_loader(source, num_epochs=1))
    loader = _loader(source, num_epochs=2, on_bad_record="skip", global_batch_size=1)
    rows = _rows(loader)
    assert loader.skipped == 2 * len(READ_BREAKAGES)
    good = set(range(NUM)) - set(READ_BREAKAGES)
    assert sorted(_index_of(synthetic)[row] for row in rows) == sorted(2 * list(good))


def test_workers_match_in_process_reads_and_skip_counts(synthetic, corrupt_dataset):
    source = ArrayRecordSource(corrupt_dataset[0])
    cfg = dict(num_epochs=2, on_bad_record="skip", global_batch_size=2)
    in_process = _loader(source, **cfg)
    workers = _loader(source, worker_count=2, **cfg)
    try:
        assert _rows(workers) == _rows(in_process)
        assert workers.skipped == in_process.skipped == 2 * len(READ_BREAKAGES)
    finally:
        workers.close()


def _bad_utf8_prompt(raw):
    example = tf_example_pb2.Example.FromString(raw)
    example.features.feature["prompt"].bytes_list.value[0] = b"a \xff\xfe prompt"
    return example.SerializeToString()


BYTE_BREAKAGES = {  # record index: (edit of its stored bytes, words of the error)
    2: (lambda raw: b"\xff\xfenot a protobuf" * 3, "record 2: 48 bytes that are not a tf.Example protobuf"),
    5: (_bad_utf8_prompt, "record 5: field 'prompt': invalid UTF-8 at byte 2"),
}


def test_bad_bytes_name_file_and_record_and_are_skippable(synthetic, tmp_path):
    path = write_dataset(synthetic.records, synthetic.spec, str(tmp_path)).path
    shard = _rewrite_raw(path, {index: edit for index, (edit, _) in BYTE_BREAKAGES.items()})
    data = bytearray(open(shard, "rb").read())  # and a corrupt chunk: record 8's bytes flipped in place
    at = data.index(synthetic.records[8]["x0_w"].tobytes())
    data[at : at + 16] = bytes(b ^ 0x55 for b in data[at : at + 16])
    open(shard, "wb").write(bytes(data))
    source = ArrayRecordSource(path)
    problems = {index: problem for index, (_, problem) in BYTE_BREAKAGES.items()} | {8: "record 8: unreadable"}
    for index, problem in problems.items():
        with pytest.raises(RecordError) as error:
            source[index]
        assert str(error.value).startswith(f"{shard}: {problem}"), (str(error.value), shard)
        assert "\n" not in str(error.value)
    loader = _loader(source, num_epochs=1, on_bad_record="skip", global_batch_size=1)
    rows = _rows(loader)
    assert loader.skipped == len(problems)
    assert sorted(_index_of(synthetic)[row] for row in rows) == sorted(set(range(NUM)) - set(problems))


def _truncate(size):
    def cut(path):
        (shard,) = glob.glob(os.path.join(path, "*.array_record-*"))
        os.truncate(shard, size(os.path.getsize(shard)))
        return shard

    return cut


def _replace(name, text):
    def replace(path):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
        return os.path.join(path, name)

    return replace


def _no_shards(path):
    info = json.loads(open(os.path.join(path, "dataset_info.json")).read())
    info["splits"][0]["shardLengths"] = []
    _replace("dataset_info.json", json.dumps(info))(path)
    return path


def _remove_shard(path):
    (shard,) = glob.glob(os.path.join(path, "*.array_record-*"))
    os.remove(shard)
    return shard


FEATURES_DICT = "tensorflow_datasets.core.features.features_dict.FeaturesDict"
FILE_BREAKAGES = {  # kind: (break the dataset at path -> the file to name, words of the error)
    "truncated": (_truncate(lambda size: size // 2), "unreadable array_record file, truncated or corrupt"),
    "truncated_small": (_truncate(lambda size: 10), "unreadable array_record file, truncated or corrupt"),
    "empty_file": (_truncate(lambda size: 0), "unreadable array_record file, truncated or corrupt"),
    "missing_shard": (_remove_shard, "missing (dataset_info.json declares it, with 12 records)"),
    "zero_records": (_no_shards, "the dataset holds no records"),
    "info_not_json": (_replace("dataset_info.json", "{not json"), "unreadable"),
    "features_not_json": (_replace("features.json", "{not json"), "not JSON"),
    "foreign_feature": (
        _replace("features.json", json.dumps({"featuresDict": {"features": {"prompt": {
            "pythonClassName": "email.mime.text.MIMEText"}}}, "pythonClassName": FEATURES_DICT})),
        "feature class 'email.mime.text.MIMEText' refused",
    ),
    "features_not_a_dict": (
        _replace("features.json", json.dumps({"pythonClassName": FEATURES_DICT.replace("features_dict", "x")})),
        "the top level is not a features dict",
    ),
}


@pytest.mark.parametrize("kind", list(FILE_BREAKAGES))
def test_unreadable_dataset_files_are_one_line_naming_the_file(synthetic, tmp_path, kind):
    path = write_dataset(synthetic.records, synthetic.spec, str(tmp_path)).path
    breaks, problem = FILE_BREAKAGES[kind]
    file = breaks(path)
    with pytest.raises(UserError) as error:
        ArrayRecordSource(path)
    assert str(error.value).startswith(f"{file}: ") and problem in str(error.value)
    assert "\n" not in str(error.value)


def test_features_file_cannot_import_a_module(synthetic, tmp_path, monkeypatch):
    """TFDS imports the module a features.json class names: a crafted dataset must not run any code."""
    path = write_dataset(synthetic.records, synthetic.spec, str(tmp_path / "data")).path
    (tmp_path / "planted_by_dataset.py").write_text("import os\nos.environ['PLANTED_MODULE_RAN'] = '1'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PLANTED_MODULE_RAN", raising=False)
    features = json.loads(open(os.path.join(path, "features.json")).read())
    features["featuresDict"]["features"]["prompt"]["pythonClassName"] = "planted_by_dataset.Text"
    _replace("features.json", json.dumps(features))(path)
    with pytest.raises(UserError, match="feature class 'planted_by_dataset.Text' refused"):
        ArrayRecordSource(path)
    assert "planted_by_dataset" not in sys.modules and "PLANTED_MODULE_RAN" not in os.environ


def test_data_dir_instead_of_version_dir_names_the_version_dir(dataset, tmp_path):
    version_dir = dataset.path
    data_dir = os.path.dirname(os.path.dirname(version_dir))
    for wrong in (data_dir, os.path.dirname(version_dir)):
        with pytest.raises(UserError, match=f"^{wrong}: not a dataset version directory .*; use {version_dir}$"):
            open_source("array_record", wrong, SextupleSpec(**DIMS))
    with pytest.raises(UserError, match=f"^{tmp_path}/nowhere: no such dataset directory$"):
        ArrayRecordSource(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=f"^{tmp_path}: not a dataset"):
        ArrayRecordSource(str(tmp_path))


def test_zero_records_is_refused_before_anything_is_written(synthetic, tmp_path):
    with pytest.raises(UserError, match=r"pnapo_pairs/1.0.0: no records to write$"):
        write_dataset([], synthetic.spec, str(tmp_path / "none"))
    bad = [_broken(record, "nan") for record in synthetic.records[:3]]
    with pytest.raises(UserError, match=r"no records to write \(3 bad records skipped\)"):
        write_dataset(bad, synthetic.spec, str(tmp_path / "all_bad"), on_bad_record="skip")
    assert not glob.glob(str(tmp_path / "*" / "pnapo_pairs" / "1.0.0"))


def test_write_leaves_no_temporary_directories(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    write_dataset(synthetic.records, synthetic.spec, str(tmp_path / "data"))
    assert os.listdir(tmp_path / "tmp") == []


def test_every_record_bad_stops_instead_of_spinning(synthetic, tmp_path):
    records = list(synthetic.records)
    path = write_dataset(records, synthetic.spec, str(tmp_path)).path
    _rewrite_shard(path, {index: _nan_into("x0_w") for index in range(NUM)})
    loader = _loader(ArrayRecordSource(path), num_epochs=3, on_bad_record="skip", global_batch_size=2)
    with pytest.raises(UserError, match=rf"all {NUM} records in a row were bad, the last: .*record \d+: field 'x0_w'"):
        next(loader)


def test_skipped_count_survives_a_resume(synthetic, corrupt_dataset, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    source = ArrayRecordSource(corrupt_dataset[0])
    cfg = dict(num_epochs=2, on_bad_record="skip", global_batch_size=2)
    loader = _loader(source, **cfg)
    head = _rows(next(loader) for _ in range(4))
    assert loader.skipped > 0
    resumed = _restored(loader, _loader(source, **cfg), tmp_path / "resumed")
    assert resumed.skipped == loader.skipped
    with ocp.CheckpointManager(tmp_path) as manager:  # as the train checkpoint stores it
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader.iterator)))
        manager.wait_until_finished()
        restored = _loader(source, **cfg)
        manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored.iterator)))
    assert restored.skipped == loader.skipped
    rest = _rows(resumed)
    assert head + rest == _rows(_loader(source, **cfg))
    assert resumed.skipped == 2 * len(READ_BREAKAGES)
    legacy = _loader(source, **cfg)  # a state saved before it carried the count still restores the position
    legacy.iterator.set_state(loader.iterator.get_state()["batches"])
    assert _rows(legacy) == rest and legacy.skipped == resumed.skipped - loader.skipped


def test_dataset_spec_disagreeing_with_model_is_refused(dataset):
    wrong = SextupleSpec(**(DIMS | {"channels": 64}))
    with pytest.raises(RecordError, match="all records: field 'channels': the dataset declares 8"):
        open_source("array_record", dataset.path, wrong)
    assert open_source("array_record", dataset.path, SextupleSpec(**DIMS)).spec.has_noise


# --- noise modes ---


def test_recorded_mode_refused_without_noises_points_to_independent(tmp_path):
    noiseless = synthetic_pairs(4, **DIMS, seed=1, with_noise=False)
    source = ArrayRecordSource(write_dataset(noiseless.records, noiseless.spec, str(tmp_path)).path)
    assert not source.spec.has_noise
    with pytest.raises(UserError, match="noise_mode='independent'"):
        _loader(source, noise_mode="recorded")
    batch = next(_loader(source, noise_mode="independent"))
    assert set(batch) == set(BATCH_KEYS) - set(NOISE_KEYS)
    check_noise_mode(synthetic_pairs(1, **DIMS, seed=0).spec, "recorded")


# --- order, epochs, resume ---


def test_seeded_order_reshuffles_each_epoch_and_is_deterministic(synthetic):
    first = _rows(_loader(synthetic, num_epochs=3, global_batch_size=NUM))
    epochs = [first[i * NUM : (i + 1) * NUM] for i in range(3)]
    assert all(sorted(epoch) == sorted(epochs[0]) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert _rows(_loader(synthetic, num_epochs=3, global_batch_size=NUM)) == first
    assert _rows(_loader(synthetic, num_epochs=3, global_batch_size=NUM, seed=4)) != first
    forever = _loader(synthetic, global_batch_size=NUM)
    assert _rows(next(forever) for _ in range(5))[: 3 * NUM] == first


def _restored(loader, fresh, directory):
    """`fresh` moved to `loader`'s position as the train checkpoint saves and restores it (pnapo_jax.checkpoint:
    grain's orbax handler, one item of a Composite)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.CheckpointManager(directory) as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader.iterator)))
        manager.wait_until_finished()
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh.iterator)))
    return fresh


def test_resume_mid_epoch_yields_exactly_the_rest(dataset, tmp_path):
    source = ArrayRecordSource(dataset.path)
    full = _rows(_loader(source, num_epochs=2, global_batch_size=2))
    loader = _loader(source, num_epochs=2, global_batch_size=2)
    head = _rows(next(loader) for _ in range(4))  # 8 of the 12 records of epoch 0
    resumed = _restored(loader, _loader(source, num_epochs=2, global_batch_size=2), tmp_path)
    rest = _rows(resumed)
    assert head + rest == full and len(rest) == 2 * NUM - 8


def test_orbax_saves_and_restores_the_iterator(synthetic, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    loader = _loader(synthetic, global_batch_size=2)
    next(loader), next(loader)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader.iterator)))
        manager.wait_until_finished()
        resumed = _loader(synthetic, global_batch_size=2)
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed.iterator)))
    assert _rows(next(resumed) for _ in range(3)) == _rows(next(loader) for _ in range(3))


# --- hosts and global arrays ---


def test_host_shards_are_disjoint_and_cover_the_dataset(synthetic):
    shards = [grain.sharding.ShardOptions(i, 3, drop_remainder=True) for i in range(3)]
    # global batch 6 over 3 hosts: 2 per host; 12 records -> 4 per host -> 2 batches each per epoch
    parts = [_rows(_loader(synthetic, shard=s, num_epochs=1, global_batch_size=6)) for s in shards]
    assert all(len(part) == NUM // 3 for part in parts)
    assert set().union(*map(set, parts)) == set(_index_of(synthetic)) and sum(map(len, parts)) == NUM
    uneven = [
        _rows(_loader(synthetic, shard=grain.sharding.ShardOptions(i, 5, True), num_epochs=1, global_batch_size=5))
        for i in range(5)
    ]
    assert all(len(part) == 2 for part in uneven)  # 12 records, 5 hosts: 2 each, 2 dropped


@pytest.mark.parametrize("axes,spec", [((8,), ("data",)), ((2, 4), (("data", "fsdp"),))])
def test_global_batch_on_mesh(synthetic, axes, spec):
    names = ("data", "fsdp")[: len(axes)]
    mesh = Mesh(np.array(jax.devices()).reshape(axes), names)
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    batch = next(_loader(synthetic, global_batch_size=8))
    arrays = global_batch(batch, sharding)
    assert set(arrays) == set(BATCH_KEYS)
    for key, array in arrays.items():
        assert array.shape == batch[key].shape and array.sharding == sharding
        assert len(array.addressable_shards) == 8
        for shard in array.addressable_shards:
            assert shard.data.shape[0] == 1
            np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index])


# --- import of noise-free preference pairs ---


def test_import_pairs_manifest(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows, latents = [], []
    for index in range(6):
        pair = [rng.standard_normal((16, 8), dtype=np.float32) for _ in range(2)]
        latents.append(pair)
        paths = {}
        for name, array in [
            ("latent_0", pair[0]),
            ("latent_1", pair[1].astype(np.float16).astype(np.float32)),
            ("prompt_embeds", rng.standard_normal((4, 6)).astype(np.float32)),
            ("pooled_prompt_embeds", rng.standard_normal(5).astype(np.float16)),
        ]:
            paths[name] = f"{index}_{name}.npy"
            np.save(tmp_path / paths[name], array)
        rows.append({"caption": f"prompt {index}", "label_0": [1, 0, 0.5, 1, 0, 1][index], **paths})
    rows[3].pop("latent_1")
    rows[3]["jpg_1"] = "3.jpg"
    (tmp_path / "m.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")

    with pytest.raises(RecordError, match=r"m.jsonl: record 3: field 'latent_1': missing; images need VAE"):
        import_pairs.import_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "raise"), 64, 64)
    import_pairs.main(
        [
            f"--input={tmp_path / 'm.jsonl'}",
            f"--out={tmp_path / 'out'}",
            "--height=64",
            "--width=64",
            "--on_bad_record=skip",
        ]
    )
    out = capsys.readouterr().out
    assert "wrote 4 pairs" in out and "skipped 1 ties and 1 bad rows" in out
    source = ArrayRecordSource(str(tmp_path / "out" / "pnapo_pairs" / "1.0.0"))
    assert len(source) == 4 and not source.spec.has_noise
    for stored, row in zip([0, 1, 4, 5], range(4), strict=True):
        record = source[row]
        assert record["prompt"] == f"prompt {stored}" and record["reward_gap"] == 1.0 and record["seed_w"] == -1
        winner = 0 if rows[stored]["label_0"] == 1 else 1
        np.testing.assert_array_equal(record["x0_w"], np.load(tmp_path / rows[stored][f"latent_{winner}"]))
        np.testing.assert_array_equal(record["x0_l"], np.load(tmp_path / rows[stored][f"latent_{1 - winner}"]))
    with pytest.raises(UserError, match="noise_mode='independent'"):
        _loader(source, noise_mode="recorded")


def test_import_cli_help_mentions_vae(capsys):
    with pytest.raises(SystemExit):
        import_pairs.main(["--help"])
    assert "VAE" in capsys.readouterr().out


def test_import_bad_rows_name_manifest_row_and_field_and_are_skippable(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"latent_0": (16, 8), "latent_1": (16, 8), "prompt_embeds": (4, 6), "pooled_prompt_embeds": (5,)}
    for name, shape in arrays.items():
        np.save(tmp_path / f"{name}.npy", rng.standard_normal(shape).astype(np.float32))
    good = json.dumps({"caption": "fine", "label_0": 1, **{name: f"{name}.npy" for name in arrays}})
    bad_rows = {  # row: (manifest line, words of the error)
        1: ('{"caption": "torn', "record 1: not a JSON line"),
        2: ("[1, 2]", "record 2: expected a JSON object, got list"),
        3: (good.replace('"caption": "fine", ', ""), "record 3: field 'caption': expected the prompt text"),
        4: (good.replace('"latent_0.npy"', "7"), "record 4: field 'latent_0': expected a file path (a string), got 7"),
        5: (good.replace('"latent_1.npy"', '"gone.npy"'), "record 5: field 'latent_1': cannot load"),
    }
    lines = [good] + [bad_rows[row][0] for row in sorted(bad_rows)] + [good]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(("\n".join(lines) + "\n").encode() + b'{"caption": "\xff"}\n')
    for row, (line, problem) in bad_rows.items():
        single = tmp_path / f"row{row}.jsonl"
        single.write_text("\n".join([good] * row + [line]) + "\n")
        with pytest.raises(RecordError) as error:
            import_pairs.import_manifest(str(single), str(tmp_path / f"out{row}"), 64, 64)
        assert str(error.value).startswith(f"{single}: {problem}") and "\n" not in str(error.value)
    report = import_pairs.import_manifest(str(manifest), str(tmp_path / "out"), 64, 64, on_bad_record="skip")
    assert (report.written, report.skipped) == (2, len(bad_rows) + 1)  # the last line is invalid UTF-8
    with pytest.raises(UserError, match=f"^{tmp_path}/none.jsonl: cannot read the manifest"):
        import_pairs.import_manifest(str(tmp_path / "none.jsonl"), str(tmp_path / "x"), 64, 64)
