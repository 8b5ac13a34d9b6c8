"""Our full PNAPO train step vs the Diffusion-DPO / Flow-DPO step users run today (diffusers + torch), CPU fp32.

Ours: `jit_steps` (policy forward + backward on winner and loser in one [2B] batch, frozen reference
forward, global-norm clip + AdamW, donated state). Theirs: diffusers' `FluxTransformer2DModel` in eager torch
with the loss of diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (policy forward on
[w; l], reference forward under no_grad on a frozen copy, per-example MSE, logits = ref_diff - model_diff,
loss = -logsigmoid(beta * logits).mean(), backward, clip_grad_norm_, torch.optim.AdamW step). Same weights
(the torch model saved and read back with our diffusers loader), same shapes: a 36.5M-parameter FLUX-shaped
model (2 double + 4 single blocks, 8 heads of 64), 2 pairs, 256 image + 64 text tokens.

After warm-up the contenders alternate run by run so machine noise hits all alike; tables give medians and
the median of the per-run ratio. Each run records wall time and process CPU time: on a machine shared with
other jobs, CPU seconds are the steadier figure (torch's OpenMP threads spin when descheduled, so its CPU time
is only meaningful with 1 thread). Also printed: FLOPs (XLA cost analysis vs torch's FlopCounterMode), this
machine's measured f32 matmul peak and the fraction of it each step reaches, and (--breakdown) where our time
goes: the step's parts timed alone, a jax.profiler op-category profile, and its matmuls timed alone.

    python benchmarks/bench_train_step.py [--runs 7] [--torch_threads 2,1] [--attention_impl xla|dot|head_major]
        [--no-dense_input_barrier] [--scan_layers]   # ours defaults to the CPU configs' head_major + barrier
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/bench_train_step.py   # try an XLA CPU flag
"""

import argparse
import collections
import dataclasses
import glob
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from machine import describe, load  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pnapo_jax import fused_adamw  # noqa: E402
from pnapo_jax.config import defaults  # noqa: E402
from pnapo_jax.convert import load_diffusers_transformer  # noqa: E402
from pnapo_jax.models import flux  # noqa: E402
from pnapo_jax.models.flux import FluxTransformer, scan_params  # noqa: E402
from pnapo_jax.setup import init_state, learning_rate, make_setup  # noqa: E402
from pnapo_jax.step import jit_steps  # noqa: E402

MODEL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
             num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
             axes_dims_rope=(16, 24, 24))
PAIRS, IMG_HW, TXT_LEN = 2, (16, 16), 64
BETA, GUIDANCE, LR, WEIGHT_DECAY, GRAD_CLIP = 2000.0, 1.0, 1e-6, 1e-2, 1.0
T_CHECK = np.array([0.3, 0.7], np.float32)[:PAIRS]  # the fixed t of the parts and the equality check
Times = list[tuple[float, float]]  # (wall s, process CPU s) per run


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _med(times: Times, i: int) -> float:
    return statistics.median(t[i] for t in times)


def interleaved(fns: dict[Any, Callable[[], Any]], runs: int, warmup: int) -> dict[Any, Times]:
    """Every fn `warmup` times, then `runs` rounds of one call each, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[Any, Times] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    return times


def matmul_peak(n: int, reps: int) -> dict[str, float]:
    """Best-of-`reps` FLOP/s of an n x n x n f32 matmul: jitted jax (wall, and per CPU-second) and torch (wall)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    mm = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    mm(ja, jb).block_until_ready(), ta @ tb
    jax_t = [_timed(lambda: mm(ja, jb).block_until_ready()) for _ in range(reps)]
    torch_t = [_timed(lambda: ta @ tb) for _ in range(reps)]
    flops = 2 * n**3
    return {"wall": flops / min(t[0] for t in jax_t), "cpu": flops / min(t[1] for t in jax_t),
            "torch_wall": flops / min(t[0] for t in torch_t)}


# ----------------------------------------------------------------------------------------------- ours


def our_config(args: argparse.Namespace) -> Any:
    """The PNAPO config of this benchmark (built like configs/tiny.py, from pnapo_jax.config.defaults()), with
    the model's compute options from the command line."""
    c = defaults()
    for k, v in MODEL.items():
        c.model[k] = list(v) if isinstance(v, tuple) else v
    c.model.attention_impl = args.attention_impl
    c.model.dense_input_barrier = args.dense_input_barrier
    c.model.scan_layers = args.scan_layers
    c.pnapo.beta, c.pnapo.guidance = BETA, GUIDANCE
    c.optim.lr, c.optim.weight_decay, c.optim.grad_clip = LR, WEIGHT_DECAY, GRAD_CLIP
    c.train.global_batch_size = PAIRS
    c.data.latent_h_tokens, c.data.latent_w_tokens, c.data.text_len = *IMG_HW, TXT_LEN
    c.mesh.fsdp = 1
    return c


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of PAIRS preference pairs with recorded noises (the keys pnapo_jax.data.batch defines)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    tokens, c = IMG_HW[0] * IMG_HW[1], MODEL["in_channels"]
    reward_w, reward_l = rng.uniform(0.5, 1.0, PAIRS), rng.uniform(0.0, 0.5, PAIRS)
    return dict(x0_w=normal(PAIRS, tokens, c), x0_l=normal(PAIRS, tokens, c), x1_w=normal(PAIRS, tokens, c),
                x1_l=normal(PAIRS, tokens, c), prompt_embeds=normal(PAIRS, TXT_LEN, MODEL["joint_attention_dim"]),
                pooled_prompt_embeds=normal(PAIRS, MODEL["pooled_projection_dim"]),
                reward_w=reward_w.astype(np.float32), reward_l=reward_l.astype(np.float32),
                reward_gap=(reward_w - reward_l).astype(np.float32))


def model_inputs(batch: dict[str, np.ndarray], t_B: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The [2B] transformer inputs and velocity targets objective.pair_loss builds (recorded noises, shared t)."""
    cat = lambda w, l: np.concatenate([w, l], axis=0)
    t2 = cat(t_B, t_B)[:, None, None]
    x0, x1 = cat(batch["x0_w"], batch["x0_l"]), cat(batch["x1_w"], batch["x1_l"])
    inputs = dict(hidden_states=(1 - t2) * x0 + t2 * x1,
                  encoder_hidden_states=cat(batch["prompt_embeds"], batch["prompt_embeds"]),
                  pooled_projections=cat(batch["pooled_prompt_embeds"], batch["pooled_prompt_embeds"]),
                  timestep=cat(t_B, t_B), img_ids=np.array(flux.img_ids(*IMG_HW)),
                  txt_ids=np.array(flux.txt_ids(TXT_LEN)), guidance=np.full(2 * PAIRS, GUIDANCE, np.float32))
    return {k: v.astype(np.float32) for k, v in inputs.items()}, (x1 - x0).astype(np.float32)


class Ours:
    """Our jitted train step on a 1-device mesh, plus its parts compiled separately."""

    def __init__(self, params: Any, args: argparse.Namespace, optax_chain: bool = False):
        setup = make_setup(our_config(args), jax.devices()[:1])
        if optax_chain:  # the step with optax's clip + AdamW chain that fused_adamw replaced (before/after runs)
            o = setup.config.optim
            setup = dataclasses.replace(setup, optimizer=fused_adamw.reference(
                learning_rate(o, setup.config.train.num_steps), o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip))
        self.setup = setup
        if args.scan_layers:
            params = scan_params(params, setup.model_cfg)
        params = jax.tree.map(jnp.array, params)  # own buffers: the state is donated every step
        self.state, self.frozen = init_state(setup, params)
        self.batch = jax.device_put({k: jnp.asarray(v) for k, v in make_batch().items()})
        self.jitted = jit_steps(setup)[0]

    def compile_step(self) -> Any:
        with self.setup.scope():
            return self.jitted.lower(self.state, self.frozen, self.batch).compile()

    def step(self) -> None:
        with self.setup.scope():
            self.state, metrics = self.jitted(self.state, self.frozen, self.batch)
        jax.block_until_ready((self.state, metrics))

    def errors(self, params: Any, x: dict[str, jax.Array], y: jax.Array) -> jax.Array:
        """Per-example mean squared velocity error [2B] (the loss's inputs)."""
        v = FluxTransformer(self.setup.model_cfg).apply({"params": params}, **x)
        return jnp.mean(jnp.square(y - v), axis=(1, 2))

    def parts(self, inputs: dict[str, np.ndarray], target: np.ndarray) -> dict[str, tuple[Callable, Any]]:
        """{part: (run once, compiled)}: reference forward, policy forward + backward, optimizer update."""
        x = {k: jnp.asarray(v) for k, v in inputs.items()}
        y = jnp.asarray(target)
        ref = jax.jit(self.errors)
        grad = jax.jit(jax.grad(lambda p, x, y: self.errors(p, x, y).sum()))
        tx = self.setup.tx

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        opt = jax.jit(update, donate_argnums=(0, 1))
        p_ref, p = self.frozen["ref"], jax.tree.map(jnp.array, self.state["params"])
        grads = grad(p, x, y)
        opt_args = [jax.tree.map(jnp.array, self.state["params"]), jax.tree.map(jnp.array, self.state["opt_state"])]

        def run_opt():
            opt_args[0], opt_args[1] = jax.block_until_ready(opt(opt_args[0], opt_args[1], grads))

        return {"reference forward": (lambda: jax.block_until_ready(ref(p_ref, x, y)),
                                      ref.lower(p_ref, x, y).compile()),
                "policy fwd + bwd": (lambda: jax.block_until_ready(grad(p, x, y)), grad.lower(p, x, y).compile()),
                "optimizer (clip + AdamW)": (run_opt, opt.lower(*opt_args, grads).compile())}


# ---------------------------------------------------------------------------------------------- torch


class Torch:
    """diffusers' Diffusion-DPO loss on FLUX (flow matching, i.e. Flow-DPO), eager torch, AdamW."""

    def __init__(self, model: FluxTransformer2DModel, batch: dict[str, np.ndarray]):
        self.policy = model.train()
        self.reference = FluxTransformer2DModel.from_config(model.config).eval().requires_grad_(False)
        self.reference.load_state_dict(model.state_dict())
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=WEIGHT_DECAY)
        self.batch_np = batch
        self.b = {k: torch.from_numpy(v) for k, v in batch.items()}
        self.img_ids = torch.from_numpy(np.array(flux.img_ids(*IMG_HW)))
        self.txt_ids = torch.from_numpy(np.array(flux.txt_ids(TXT_LEN)))

    def inputs(self, t_B: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, torch.Tensor]:
        b = self.b
        cat = lambda w, l: torch.cat([w, l], dim=0)
        t = cat(t_B, t_B)
        x0, x1 = cat(b["x0_w"], b["x0_l"]), cat(*noise)
        kw = dict(hidden_states=(1 - t[:, None, None]) * x0 + t[:, None, None] * x1,
                  encoder_hidden_states=cat(b["prompt_embeds"], b["prompt_embeds"]),
                  pooled_projections=cat(b["pooled_prompt_embeds"], b["pooled_prompt_embeds"]), timestep=t,
                  img_ids=self.img_ids, txt_ids=self.txt_ids, guidance=torch.full((2 * PAIRS,), GUIDANCE),
                  return_dict=False)
        return kw, x1 - x0

    def loss(self, t_B: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """train_diffusion_dpo.py's loss computation (FLUX flow-matching inputs and target)."""
        kw, target = self.inputs(t_B, noise)
        model_pred = self.policy(**kw)[0]
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
        model_losses_w, model_losses_l = model_losses.chunk(2)
        model_diff = model_losses_w - model_losses_l
        with torch.no_grad():
            ref_preds = self.reference(**kw)[0]
            ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
            ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
            ref_losses_w, ref_losses_l = ref_loss.chunk(2)
            ref_diff = ref_losses_w - ref_losses_l
        logits = ref_diff - model_diff
        return -1 * F.logsigmoid(BETA * logits).mean()

    def step(self) -> torch.Tensor:
        """One optimizer step; Flow-DPO draws one noise shared by winner and loser and one t per pair."""
        self.opt.zero_grad(set_to_none=True)
        noise = torch.randn_like(self.b["x0_w"])
        loss = self.loss(torch.rand(PAIRS), (noise, noise))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), GRAD_CLIP)
        self.opt.step()
        return loss.detach()

    def parts(self, inputs: dict[str, np.ndarray], target: np.ndarray) -> dict[str, Callable]:
        x = {k: torch.from_numpy(v) for k, v in inputs.items()}
        y = torch.from_numpy(target)
        params = list(self.policy.parameters())

        def ref():
            with torch.no_grad():
                return (self.reference(**x, return_dict=False)[0] - y).pow(2).mean(dim=(1, 2))

        def fwd_bwd():
            self.policy.zero_grad(set_to_none=True)
            (self.policy(**x, return_dict=False)[0] - y).pow(2).mean(dim=(1, 2)).sum().backward()

        def opt():
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            self.opt.step()

        fwd_bwd()
        return {"reference forward": ref, "policy fwd + bwd": fwd_bwd, "optimizer (clip + AdamW)": opt}


def torch_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def with_threads(fn: Callable[[], Any], n: int) -> Callable[[], Any]:
    def run():
        torch.set_num_threads(n)
        return fn()
    return run


def check_same_errors(ours: Ours, theirs: Torch) -> float:
    """Max relative difference of the per-example velocity errors [2B] of the two policies on the same inputs
    (at init policy = reference, so both DPO losses are log 2 whatever the model: the errors are the check)."""
    inputs, target = model_inputs(theirs.batch_np, T_CHECK)
    mine = np.asarray(ours.errors(ours.state["params"], inputs, target))
    with torch.no_grad():
        x = {k: torch.from_numpy(v) for k, v in inputs.items()}
        their = (theirs.policy(**x, return_dict=False)[0] - torch.from_numpy(target)).pow(2).mean(dim=(1, 2))
    return float(np.max(np.abs(mine - their.numpy()) / their.numpy()))


# ------------------------------------------------------------------------------- what the HLO is made of

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def _dims(text: str, name: str) -> tuple[int, ...]:
    m = re.search(name + r"=\{([\d,]*)\}", text)
    return tuple(int(d) for d in m[1].split(",") if d) if m else ()


def _shape(type_str: str) -> tuple[int, ...]:
    m = re.match(r"f32\[([\d,]*)\]", type_str)
    return tuple(int(d) for d in m[1].split(",") if d) if m else ()


class Hlo:
    """A compiled executable's optimized HLO: instructions, the computations fusions call, the dots."""

    def __init__(self, compiled: Any):
        self.instr: dict[str, str] = {}
        self.bodies: dict[str, list[str]] = collections.defaultdict(list)
        shapes, dots, comp = {}, [], ""
        for line in compiled.as_text().splitlines():
            if not line.startswith(" ") and (m := _COMP.match(line)):
                comp = m[1]
                continue
            if not (m := _INSTR.match(line)):
                continue
            self.instr[m[1]] = line
            self.bodies[comp].append(line)
            shapes[m[1]] = _shape(m[2])
            if m[3] == "dot" and m[2].startswith("f32"):
                lhs, rhs = re.findall(r"%([\w.\-]+)", m[4])[:2]
                dn = ((_dims(m[4], "lhs_contracting_dims"), _dims(m[4], "rhs_contracting_dims")),
                      (_dims(m[4], "lhs_batch_dims"), _dims(m[4], "rhs_batch_dims")))
                dots.append((lhs, rhs, dn))
        self.dots = [(shapes[lhs], shapes[rhs], dn) for lhs, rhs, dn in dots]

    def body(self, name: str) -> str:
        """The instruction's own line plus, for a fusion, its fused computation."""
        line = self.instr.get(name, "")
        called = re.search(r"calls=%([\w.\-]+)", line)
        return "\n".join([line, *self.bodies.get(called[1], [])]) if called else line

    def category(self, name: str) -> str:
        """matmul | transpose / copy | elementwise / reduction, and where it comes from (fwd, bwd, optimizer)."""
        text, line = self.body(name), self.instr.get(name, "")
        op_name = m[1] if (m := re.search(r'op_name="([^"]*)"', line)) else ""
        if "FluxTransformer" not in op_name:
            return "optimizer, loss, t / noise draws"
        where = "bwd" if "transpose(jvp(" in op_name else "fwd"
        if " dot(" in text:
            return f"{where}: matmul fusions (YNNPACK; fused epilogues included)"
        if re.match(r"(copy|transpose)", name):
            return f"{where}: transposes / copies (+ fused producers)"
        return f"{where}: elementwise / reductions (norms, softmax, RoPE, GELU, modulation)"


def _dot_flops(lhs: tuple[int, ...], rhs: tuple[int, ...], dn: tuple) -> float:
    (lc, rc), (lb, rb) = dn
    lhs_free = [d for i, d in enumerate(lhs) if i not in lc and i not in lb]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
    return 2.0 * math.prod(lhs[i] for i in lb) * math.prod(lhs_free) * math.prod(rhs_free) * math.prod(
        lhs[i] for i in lc)


def dots_alone(dots: list[tuple], reps: int) -> tuple[float, float]:
    """(FLOPs, CPU seconds) of the dots, each run as a standalone jitted matmul (median of `reps` per shape)."""
    cache: dict[tuple, float] = {}
    for lhs, rhs, dn in dots:
        if (lhs, rhs, dn) not in cache:
            a, b = jnp.ones(lhs, jnp.float32), jnp.ones(rhs, jnp.float32)
            f = jax.jit(lambda a, b, dn=dn: jax.lax.dot_general(a, b, dn))
            run = lambda f=f, a=a, b=b: f(a, b).block_until_ready()
            run()
            cache[(lhs, rhs, dn)] = statistics.median(_timed(run)[1] for _ in range(reps))
    return sum(_dot_flops(*d) for d in dots), sum(cache[d] for d in dots)


def op_profile(step: Callable[[], Any], hlo: Hlo, steps: int) -> dict[str, float]:
    """Thread-seconds per step of each op category, from a jax.profiler trace of `steps` steps (needs
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true, which main sets for --breakdown)."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(steps):
            step()
        jax.profiler.stop_trace()
        profile = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    out: dict[str, float] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):  # the threads that run the executable's ops
                for event in line.events:
                    if event.name in hlo.instr:
                        out[hlo.category(event.name)] += event.duration_ns / 1e9 / steps
    return out


# ----------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> None:
    threads = [int(n) for n in args.torch_threads.split(",")]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        _, params = load_diffusers_transformer(tmp)
    batch = make_batch()
    ours = Ours(params, args)
    before = Ours(params, args, optax_chain=True) if args.optax_chain else None
    theirs = Torch(model, batch)
    del params

    print(f"PNAPO train step vs diffusers Diffusion-DPO step | FLUX-shaped {n_params / 1e6:.1f}M params "
          f"(2 double + 4 single blocks, 8 heads x 64) | {PAIRS} pairs = [{2 * PAIRS}] batch, "
          f"{IMG_HW[0] * IMG_HW[1]} image + {TXT_LEN} text tokens | CPU fp32 | attention_impl={args.attention_impl}, "
          f"dense_input_barrier={args.dense_input_barrier}, scan_layers={args.scan_layers}\nmachine: {describe()}")
    err = check_same_errors(ours, theirs)
    print(f"per-example velocity errors of the two policies on the same inputs: max rel. diff {err:.1e}")
    if err > 1e-4:
        raise RuntimeError("the two models do not compute the same thing")

    compile_s = _timed(ours.compile_step)[0]
    compiled = ours.compile_step()
    hlo = Hlo(compiled)
    xla_flops = compiled.cost_analysis()["flops"]
    flops = sum(_dot_flops(*d) for d in hlo.dots)  # the model FLOPs both steps do: matmuls + attention
    torch_counted = torch_flops(theirs.step)  # FlopCounterMode has no formula for CPU SDPA: no attention
    peak = matmul_peak(args.peak_n, args.peak_reps)

    fns: dict[str, Callable[[], Any]] = {"ours (jax, jit)": ours.step}
    if before is not None:
        before.compile_step()
        fns["ours, optax chain"] = before.step
    for n in threads:
        fns[f"torch eager, {n} thread{'s' * (n > 1)}"] = with_threads(theirs.step, n)
    times = interleaved(fns, args.runs, args.warmup)
    load_after = load()

    print(f"\n{'full train step':<26}{'wall s':>8}{'min s':>8}{'CPU s':>8}{'%peak wall':>11}{'%peak CPU':>10}"
          f"{'ours/this wall':>15}{'CPU':>6}")
    for name, t in times.items():
        ratio = [statistics.median(a[i] / b[i] for a, b in zip(times["ours (jax, jit)"], t, strict=True))
                 for i in (0, 1)]
        print(f"{name:<26}{_med(t, 0):>8.3f}{min(x[0] for x in t):>8.3f}{_med(t, 1):>8.3f}"
              f"{100 * flops / _med(t, 0) / peak['wall']:>10.0f}%{100 * flops / _med(t, 1) / peak['cpu']:>9.0f}%"
              f"{ratio[0]:>15.2f}{ratio[1]:>6.2f}")
    print(f"{args.runs} interleaved runs after {args.warmup} warm-up; target: ours/torch <= 0.80; our compile "
          f"{compile_s:.1f} s excluded; load average (1/5/15 min) after: {load_after} on {os.cpu_count()} cores")
    print(f"step FLOPs: {flops / 1e9:.1f} G in the dots of our HLO (matmuls + attention; %peak uses these) | "
          f"torch FlopCounterMode {torch_counted / 1e9:.1f} G (it counts 0 for CPU scaled_dot_product_attention) "
          f"| XLA cost analysis {xla_flops / 1e9:.1f} G (all ops, elementwise included)")
    print(f"measured f32 matmul peak ({args.peak_n}^3, best of {args.peak_reps}): jax {peak['wall'] / 1e9:.0f} "
          f"GFLOP/s wall, {peak['cpu'] / 1e9:.0f} GFLOP per CPU-second; torch {peak['torch_wall'] / 1e9:.0f} "
          f"GFLOP/s wall | FLOP floor of the step: {flops / peak['wall']:.3f} s wall, "
          f"{flops / peak['cpu']:.3f} CPU-s")
    if args.breakdown:
        breakdown(ours, theirs, batch, hlo, args, peak, min(threads))


def breakdown(ours: Ours, theirs: Torch, batch: dict[str, np.ndarray], hlo: Hlo, args: argparse.Namespace,
              peak: dict[str, float], torch_threads: int) -> None:
    """Where the time goes: parts alone, our op categories, our matmuls alone."""
    torch.set_num_threads(torch_threads)
    inputs, target = model_inputs(batch, T_CHECK)
    our_parts, their_parts = ours.parts(inputs, target), theirs.parts(inputs, target)
    fns = {}
    for name in our_parts:
        fns[("ours", name)] = our_parts[name][0]
        fns[("torch", name)] = their_parts[name]
    times = interleaved(fns, args.runs, 1)
    print(f"\nparts timed alone (torch {torch_threads} thread{'s' * (torch_threads > 1)}); CPU = process CPU s; "
          f"GFLOP = dots in our HLO; floor = those at the jax matmul peak per CPU-second; load after: {load()}")
    print(f"{'part':<26}{'ours wall':>10}{'CPU':>7}{'torch wall':>11}{'CPU':>7}{'ours/torch CPU':>15}{'GFLOP':>7}"
          f"{'floor CPU-s':>12}{'ours %pk':>9}{'torch %pk':>10}")
    for name, (_, compiled) in our_parts.items():
        o, t = times[("ours", name)], times[("torch", name)]
        floor = sum(_dot_flops(*d) for d in Hlo(compiled).dots) / peak["cpu"]
        print(f"{name:<26}{_med(o, 0):>10.3f}{_med(o, 1):>7.3f}{_med(t, 0):>11.3f}{_med(t, 1):>7.3f}"
              f"{_med(o, 1) / _med(t, 1):>15.2f}{floor * peak['cpu'] / 1e9:>7.1f}{floor:>12.3f}"
              f"{100 * floor / _med(o, 1):>8.0f}%{100 * floor / _med(t, 1):>9.0f}%")

    ours.step()
    cpu = statistics.median(_timed(ours.step)[1] for _ in range(3))
    profile = op_profile(ours.step, hlo, steps=3)
    total = sum(profile.values())
    print(f"\nour step by op category (jax.profiler, thread-time shares; CPU s = share x {cpu:.3f} CPU-s/step); "
          f"load after: {load()}")
    for name, seconds in sorted(profile.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<72}{100 * seconds / total:>5.1f}%{cpu * seconds / total:>7.3f} CPU-s")

    flops, seconds = dots_alone(hlo.dots, reps=5)
    print(f"our step's {len(hlo.dots)} dots run alone: {flops / 1e9:.1f} GFLOP in {seconds:.3f} CPU-s "
          f"({flops / seconds / 1e9:.0f} GFLOP per CPU-s; the 2048^3 peak is {peak['cpu'] / 1e9:.0f}) -> "
          f"everything else costs {cpu - seconds:.3f} of the step's {cpu:.3f} CPU-s; load after: {load()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="interleaved timed runs (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--torch_threads", default=f"{os.cpu_count()}",
                        help="comma-separated torch thread counts, each a contender (e.g. 2,1)")
    parser.add_argument("--peak_n", type=int, default=2048)
    parser.add_argument("--peak_reps", type=int, default=8)
    parser.add_argument("--attention_impl", default="head_major", choices=("xla", "dot", "head_major"))
    parser.add_argument("--dense_input_barrier", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--scan_layers", action="store_true")
    parser.add_argument("--optax_chain", action="store_true",
                        help="also time our step with optax's clip + AdamW chain (the optimizer before fused_adamw)")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="parts alone, op-category profile, dots alone (adds ~1 minute)")
    args = parser.parse_args()
    if args.breakdown:  # per-op trace events; must be set before jax starts its CPU backend
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true".strip()
    main(args)
