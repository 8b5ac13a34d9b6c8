"""FLUX.1-dev aligned with PNAPO on the GPUs of one host: configs/flux_tpu.py with cuDNN's flash attention.

    pip install -e '.[gpu]'
    python -m pnapo_jax.main --config=configs/flux_gpu.py --workdir=/runs/pnapo --config.data.path=/data/pairs/1.0.0
    python -m pnapo_jax.main --config=configs/flux_gpu.py:lora ...   # LoRA on one GPU

The model, the loss and every setting the paper fixes are flux_tpu.py's (this file loads it): only the attention
kernel and the batch layout differ. Variants are flux_tpu.py's and combine the same way (`:lora,independent`).
The memory figures are TPU ones (docs/tpu_fit.md); on GPUs they are not measured.
"""

import importlib.util
import pathlib

import ml_collections

_TPU = pathlib.Path(__file__).with_name("flux_tpu.py")


def _flux_tpu():
    spec = importlib.util.spec_from_file_location("flux_tpu", _TPU)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: comma-separated variants of configs/flux_tpu.py ("" = PNAPO, full fine-tune)."""
    c = _flux_tpu().get_config(arg)
    c.model.attention_impl = "cudnn"  # jax.nn.dot_product_attention's cuDNN flash attention (bf16, no [L, L])
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over the host's GPUs (NVLink)
    c.train.grad_accum_steps = 1  # 16 pairs = 32 images over 8 GPUs: 4 per GPU (remat "offload" as on TPU)
    c.data.worker_count = 8
    if "lora" in arg.split(","):
        # One GPU (80 GB): the bf16 base (22 GiB) plus a micro-batch of 4 pairs; unmeasured, lower it if needed.
        c.train.grad_accum_steps = 4
    return c
