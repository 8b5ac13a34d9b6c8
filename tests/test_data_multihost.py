"""Two JAX processes (4 CPU devices each) read disjoint halves of a dataset and assemble one global batch.

Each host runs this file as a script: `jax.distributed.initialize`, the default `ShardByJaxProcess` loader,
`global_batch` on an 8-device mesh spanning both processes, and a jitted sum that needs both halves.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

HOSTS, DEVICES_PER_HOST, NUM, GLOBAL_BATCH = 2, 4, 17, 8
DIMS = dict(image_tokens=16, channels=8, text_len=4, text_dim=6, pooled_dim=5)


def _host(process_id: int, port: int, data_path: str, out_path: str) -> None:
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from pnapo_jax.data.pipeline import LoaderConfig, global_batch, make_loader
    from pnapo_jax.data.source import ArrayRecordSource

    jax.config.update("jax_num_cpu_devices", DEVICES_PER_HOST)
    jax.distributed.initialize(f"127.0.0.1:{port}", HOSTS, process_id)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    loader = make_loader(ArrayRecordSource(data_path), LoaderConfig(GLOBAL_BATCH, num_epochs=1), "recorded")
    rows, local_sums, global_sums = [], [], []
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))
    for batch in loader:
        arrays = global_batch(batch, sharding)
        assert all(arrays[k].shape == (GLOBAL_BATCH, *batch[k].shape[1:]) for k in batch)
        shards = sorted(arrays["x0_w"].addressable_shards, key=lambda s: s.index[0].start)
        assert np.array_equal(np.concatenate([np.asarray(s.data) for s in shards]), batch["x0_w"])
        rows += [row.tobytes().hex() for row in batch["x0_w"]]
        local_sums.append(float(batch["reward_w"].astype(np.float64).sum()))
        global_sums.append(float(total(arrays["reward_w"])))
    with open(out_path, "w") as f:
        json.dump(dict(rows=rows, local_sums=local_sums, global_sums=global_sums), f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_read_disjoint_halves_and_build_one_global_batch(tmp_path):
    from pnapo_jax.data.builder import write_dataset
    from pnapo_jax.data.synthetic import synthetic_pairs

    synthetic = synthetic_pairs(NUM, **DIMS, seed=0)
    path = write_dataset(synthetic.records, synthetic.spec, str(tmp_path / "data")).path
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    port, outs = _free_port(), [str(tmp_path / f"host{i}.json") for i in range(HOSTS)]
    hosts = [
        subprocess.Popen([sys.executable, __file__, str(i), str(port), path, outs[i]], env=env) for i in range(HOSTS)
    ]
    assert [host.wait(timeout=180) for host in hosts] == [0] * HOSTS
    results = [json.load(open(out)) for out in outs]

    per_host = (NUM // HOSTS) // (GLOBAL_BATCH // HOSTS) * (GLOBAL_BATCH // HOSTS)
    assert all(len(r["rows"]) == per_host for r in results)  # 8 of 17: one record dropped for even shards
    assert not set(results[0]["rows"]) & set(results[1]["rows"])
    every = {record["x0_w"].tobytes().hex() for record in synthetic.records}
    assert len(every - set(results[0]["rows"]) - set(results[1]["rows"])) == NUM - HOSTS * per_host
    for step in range(per_host // (GLOBAL_BATCH // HOSTS)):
        both = results[0]["local_sums"][step] + results[1]["local_sums"][step]
        assert all(np.isclose(r["global_sums"][step], both, rtol=1e-6) for r in results)


if __name__ == "__main__":
    _host(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
