"""Training-step cost of our Flax FLUX vs diffusers' FluxTransformer2DModel: forward + backward, CPU, fp32.

Both compute mean(output^2) and its gradient wrt every weight (ours: jitted `jax.value_and_grad`; diffusers:
`loss.backward()`), on identical weights (the torch model saved and read back with our diffusers loader) and
inputs. Default: a ~35M-parameter FLUX-shaped model (2 double + 4 single blocks, 8 heads of 64), batch 2,
256 image tokens, 64 text tokens. After warm-up (compilation excluded) the runs alternate ours / torch so
that machine noise hits both alike; the table gives medians and the median of the per-pair ratio.

    python benchmarks/bench_flux.py [--runs 10] [--batch 2]
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from machine import load  # noqa: E402

from pnapo_jax.convert import load_diffusers_transformer  # noqa: E402
from pnapo_jax.models import flux  # noqa: E402

MODEL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
             num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
             axes_dims_rope=(8, 28, 28))
IMG_HW, TXT_LEN, GUIDANCE = (16, 16), 64, 3.5


def _inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return dict(hidden_states=normal(batch, IMG_HW[0] * IMG_HW[1], MODEL["in_channels"]),
                encoder_hidden_states=normal(batch, TXT_LEN, MODEL["joint_attention_dim"]),
                pooled_projections=normal(batch, MODEL["pooled_projection_dim"]),
                timestep=rng.uniform(0, 1, batch).astype(np.float32),
                img_ids=np.array(flux.img_ids(*IMG_HW)), txt_ids=np.array(flux.txt_ids(TXT_LEN)),
                guidance=np.full(batch, GUIDANCE, np.float32))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(runs: int, batch: int) -> None:
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**MODEL).train()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        cfg, params = load_diffusers_transformer(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    x = _inputs(batch)
    x_torch = {k: torch.from_numpy(v) for k, v in x.items()}

    mse = lambda p: jnp.mean(flux.FluxTransformer(cfg).apply({"params": p}, **x) ** 2)
    value_and_grad = jax.jit(jax.value_and_grad(mse))

    def ours():
        return jax.block_until_ready(value_and_grad(params))

    def theirs():
        model.zero_grad(set_to_none=True)
        loss = model(**x_torch).sample.pow(2).mean()
        loss.backward()
        return loss

    compile_s = _timed(ours)
    loss_ours, loss_theirs = float(ours()[0]), float(theirs().detach())
    if not np.isclose(loss_ours, loss_theirs, rtol=1e-4):
        raise RuntimeError(f"the two models disagree: loss {loss_ours} (ours) vs {loss_theirs} (diffusers)")
    for _ in range(2):
        ours(), theirs()
    load_before = load()
    t_ours, t_theirs = [], []
    for _ in range(runs):
        t_ours.append(_timed(ours))
        t_theirs.append(_timed(theirs))

    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    ratio = statistics.median(a / b for a, b in zip(t_ours, t_theirs, strict=True))
    print(f"FLUX fwd+bwd, CPU fp32, {os.cpu_count()} cores | params {n_params / 1e6:.1f}M | batch {batch}, "
          f"{IMG_HW[0] * IMG_HW[1]} image + {TXT_LEN} text tokens | {runs} interleaved runs | "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"{'':24}{'median s':>10}{'min s':>10}")
    print(f"{'ours (flax, jit)':24}{med_ours:10.3f}{min(t_ours):10.3f}")
    print(f"{'diffusers (torch eager)':24}{med_theirs:10.3f}{min(t_theirs):10.3f}")
    print(f"median ratio ours/torch: {ratio:.2f}   (our compile + first run: {compile_s:.1f} s; "
          f"loss {loss_ours:.6f} vs {loss_theirs:.6f})")
    print(f"load average (1/5/15 min) before / after the timed runs: {load_before} / {load()} "
          "(other processes share these cores when it exceeds the core count)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    main(args.runs, args.batch)
