"""When training joins a multi-process JAX run by itself (pnapo_jax.sharding.maybe_initialize_distributed)."""

import jax
import pytest

from pnapo_jax import sharding


@pytest.fixture
def initialize(monkeypatch):
    """Records jax.distributed.initialize calls made before any backend started (as in `pnapo_jax.main`)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(sharding.xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(sharding.cloud_tpu_init, "running_in_cloud_tpu_vm", False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    return calls


def test_nothing_is_called_off_a_cluster(initialize, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")  # not what decides: TPU VMs need not set it
    sharding.maybe_initialize_distributed()
    assert initialize == []


def test_cloud_tpu_vm_initializes_with_jax_auto_detection(initialize, monkeypatch):
    monkeypatch.setattr(sharding.cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    sharding.maybe_initialize_distributed()
    assert initialize == [((), {})]  # jax reads workers and this worker's index from the metadata server


def test_coordinator_address_initializes(initialize, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
    sharding.maybe_initialize_distributed()
    assert initialize == [((), {})]


def test_a_started_backend_stays_single_process(initialize, monkeypatch):
    monkeypatch.setattr(sharding.cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    monkeypatch.setattr(sharding.xla_bridge, "backends_are_initialized", lambda: True)
    sharding.maybe_initialize_distributed()
    assert initialize == []
