"""PNAPO training: the loop around the jitted step (pnapo_jax.step) on what pnapo_jax.setup builds from the
config: data, pair generation first when asked, evals, metrics, checkpoints, resume and early stops."""

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from pnapo_jax import backbones, config_check, generate, reference, sharding, worlds
from pnapo_jax import workdir as run_dir
from pnapo_jax.errors import UserError
from pnapo_jax.setup import (
    Setup,
    base_params,
    evaluated_params,
    init_state,
    make_setup,
    policy_variables,
    reference_variables,
)
from pnapo_jax.step import Metrics, jit_steps, with_rules


def make_source(config: ml_collections.ConfigDict, path: str, seed_offset: int = 0) -> Any:
    """The record source config.data names, refused unless its shapes are the backbone's record spec."""
    from pnapo_jax.data.source import open_source

    d = config.data
    if d.source in ("array_record", "generate") and not path:
        raise ValueError(f"config.data.source={d.source!r} needs a dataset path (config.data.path)")
    kind = "array_record" if d.source == "generate" else d.source
    spec = backbones.backbone_of(config).record_spec(config)
    return open_source(kind, path, spec, d.synthetic_num, config.seed + seed_offset)


def make_train_loader(config: ml_collections.ConfigDict, source: Any, first_step: int = 0,
                      per_record: dict[str, np.ndarray] | None = None) -> Any:
    from pnapo_jax.data.pipeline import LoaderConfig, make_loader

    d = config.data
    cfg = LoaderConfig(global_batch_size=config.train.global_batch_size, seed=config.seed,
                       worker_count=d.worker_count, on_bad_record=d.on_bad_record)
    return make_loader(source, cfg, config.pnapo.noise_mode, first_step=first_step, per_record=per_record)


def _eval_batches(config: ml_collections.ConfigDict, setup: Setup) -> list[dict[str, jax.Array]] | None:
    """A fixed list of held-out global batches (read once), or None without an eval set."""
    if not config.data.eval_path and config.data.source != "synthetic":
        return None
    if config.train.eval_every <= 0:
        return None
    from pnapo_jax.data.pipeline import global_batch

    loader = make_train_loader(config, make_source(config, config.data.eval_path, seed_offset=10_000))
    batch_sh = sharding.batch_sharding(setup.mesh)
    batches = [global_batch(next(loader), batch_sh) for _ in range(config.train.eval_batches)]
    loader.close()
    return batches


def train_prompts(config: ml_collections.ConfigDict, workdir: epath.Path) -> str:
    """WORKDIR/prompts_train.txt: the world's prompts of split config.generate.split (the first
    config.generate.max_prompts), what pairs are generated for."""
    prompts = workdir / "prompts_train.txt"
    if jax.process_index() == 0:
        split_prompts = worlds.make_world(config).prompts(config.generate.split)
        prompts.write_text("\n".join(split_prompts[: config.generate.max_prompts or None]))
    return str(prompts)


def pairs_path(config: ml_collections.ConfigDict, workdir: str | epath.Path, show_progress: bool) -> str:
    """config.data.path; for source "generate", the base model's pairs for the world's train prompts (split
    config.generate.split), made (resumably) into WORKDIR/pairs first."""
    if config.data.source != "generate":
        return config.data.path
    workdir = epath.Path(workdir)
    generate.run(config, train_prompts(config, workdir), str(workdir / "pairs"), show_progress)
    return str(workdir / "pairs")


def regenerate_pairs(config: ml_collections.ConfigDict, setup: Setup, state: Any, frozen: Any,
                     workdir: epath.Path, round_: int, show_progress: bool) -> tuple[str, dict[str, float]]:
    """Iterative PNAPO's round `round_` (>= 1): the policy at this step (its EMA when train.ema_decay > 0, what
    evals use) samples the train prompts from new recorded noises (generate.seed + round_) by pair generation's
    own code, into WORKDIR/pairs_round{round_} (resumable by chunks, as `python -m pnapo_jax.generate`).
    Returns the path and the round's compute as metrics (seconds, images, model forwards of this call)."""
    gen_config = config.copy_and_resolve_references()
    gen_config.generate.seed = config.generate.seed + round_
    out = workdir / f"pairs_round{round_}"
    variables = policy_variables(setup, evaluated_params(setup, state), frozen)
    summary = generate.run(gen_config, train_prompts(config, workdir), str(out), show_progress, variables, setup)
    return str(out), {"regen/round": round_, "regen/seconds": summary["seconds_now"],
                      "regen/images": summary["images_sampled_now"],
                      "regen/model_forwards": summary["model_forwards_now"]}


class Stopped(Exception):
    """The run stopped early on a signal (preemption, Ctrl-C) with its checkpoint saved: rerun it to resume."""

    EXIT_CODE = 75  # EX_TEMPFAIL: what `python -m pnapo_jax.main` exits with then, so launchers can tell it apart

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped at step {step} on {signal_name or 'a preemption notice'}; the checkpoint is saved")
        self.step = step


def _check_finite(line: dict[str, Any], config: ml_collections.ConfigDict, step: int) -> None:
    """Stops a run whose updates have all been non-finite (so skipped) for train.max_nonfinite_steps steps."""
    limit = config.train.max_nonfinite_steps
    if limit > 0 and line.get("nonfinite_streak", 0) >= limit:
        raise UserError(f"training diverged: the last {line['nonfinite_streak']} updates (to step {step}) had "
                        "non-finite gradients and were skipped; lower config.optim.lr or check the data, then "
                        "rerun to resume from the last checkpoint (config.train.max_nonfinite_steps sets the limit)")


def _finished(workdir: epath.Path, step: int) -> dict[str, Any]:
    """The results a finished run logged: its last train line and its last sampling eval."""
    from pnapo_jax.metrics import read_lines

    path = workdir / "metrics.jsonl"
    lines = [d for d in read_lines(path) if d.get("step", 0) <= step] if path.exists() else []
    last = lambda key: next((d for d in reversed(lines) if key in d), {})
    return {**last("loss"), **last("eval/reward_mean")}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None,
                       show_progress: bool = True) -> dict[str, Any]:
    """Train (resuming from WORKDIR/checkpoints if there are any); returns the last train and eval metrics.

    One run at a time per workdir (WORKDIR/run.lock). Raises Stopped when SIGTERM / SIGINT stopped it early
    (checkpoint saved), UserError for what the user can fix (one line). A finished run returns its results.
    """
    from pnapo_jax.checkpoint import Checkpointer
    from pnapo_jax.data.pipeline import global_batch
    from pnapo_jax.metrics import MetricWriter

    sharding.maybe_initialize_distributed()
    setup = make_setup(config, devices)
    workdir = run_dir.resolve(workdir)
    say = lambda text: print(text, flush=True) if jax.process_index() == 0 else None
    # every resource joins the stack as it is made, so an error anywhere closes them all and surfaces itself
    # (an unclosed checkpointer hid it behind orbax's "cannot schedule new futures after interpreter shutdown")
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_dir.locked(workdir))
        ckpt = stack.enter_context(Checkpointer(str(workdir / "checkpoints"), config.checkpoint))
        start = ckpt.latest_step()
        config_check.check_resume(config, workdir)  # before config.json is replaced by this run's
        reference.check_or_record(config, str(workdir), resuming=start is not None, write=jax.process_index() == 0)
        if jax.process_index() == 0:  # export and eval scripts rebuild the model from it
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        logging.info("mesh %s; model %s", dict(setup.mesh.shape), setup.model_cfg)
        data = pairs_path(config, workdir, show_progress)
        source = make_source(config, data)
        same_hosts = start is not None and ckpt.has_data_state(start)
        if start is not None and not same_hosts:  # the saved positions are per host: start at the step's batch
            logging.warning("checkpoint %d was written by another number of hosts: data resumes at global batch "
                            "%d (exact unless records were skipped as bad)", start, start)
        base = base_params(setup)
        state, frozen = init_state(setup, base)
        del base
        cache = None
        if config.pnapo.ref_cache:
            from pnapo_jax import ref_cache

            cache = ref_cache.load_or_build(config, setup, frozen, source, data, workdir, say)
        every = config.train.regenerate_every  # iterative PNAPO: round r trains steps r K + 1 .. (r + 1) K
        round_ = (start or 0) // every if every else 0
        new_round = bool(round_) and start % every == 0  # saved just before the round's pairs were (all) made
        if round_ and not new_round:
            source = make_source(config, str(workdir / f"pairs_round{round_}"))
        first = start - round_ * every if start is not None else 0
        loader = make_train_loader(config, source, 0 if same_hosts or start is None else first, cache)
        stack.callback(loader.close)
        resuming = start is not None
        if resuming:  # the newest checkpoint that restores: a damaged newest one falls back to an older one
            state = ckpt.restore(start, setup.abstract_state, loader.iterator if same_hosts and not new_round
                                 else None)
            if every and int(state["step"]) // every != round_:
                raise UserError(f"checkpoint {start} did not restore and the older one is of another iterative "
                                f"PNAPO round; move {workdir / 'checkpoints' / str(start)} aside and rerun")
        start = int(state["step"])
        if start >= config.train.num_steps:
            say(f"already finished at step {start} ({workdir})")
            return _finished(workdir, start)
        if resuming:
            say(f"resuming from step {start} ({workdir})")
        writer = MetricWriter(str(workdir), config.train.num_steps, start, show_progress)
        stack.callback(writer.close)
        step_fn, eval_fn = (with_rules(setup, f) for f in jit_steps(setup))
        eval_batches = _eval_batches(config, setup)
        if config.eval.sample_every > 0:
            writer.phase("evaluating the base")
        sample_eval = _sample_eval(config, setup, frozen)
        batch_sh = sharding.batch_sharding(setup.mesh)
        line: dict[str, Any] = {}
        evaluated: dict[str, Any] = {}

        def evaluate_samples(step: int) -> None:
            nonlocal evaluated
            writer.phase("evaluating")
            metrics, images, rewards = sample_eval(policy_variables(setup, evaluated_params(setup, state), frozen))
            evaluated = writer.write(step, metrics)
            if jax.process_index() == 0:
                from pnapo_jax import report

                report.write(workdir, sample_eval, images, rewards, step)
            writer.phase("training")

        def next_round(step: int) -> Any:
            """Round step // K's pairs from the policy at `step` (checkpointed first), and a loader on them."""
            writer.phase(f"generating round {step // every}'s pairs")
            path, costs = regenerate_pairs(config, setup, state, frozen, workdir, step // every, show_progress)
            writer.write(step, costs)
            writer.phase("training")
            fresh = make_train_loader(config, make_source(config, path))
            stack.callback(fresh.close)
            return fresh

        if new_round:
            loader = next_round(start)
        if sample_eval and start == 0:
            evaluate_samples(0)
        for step in range(start + 1, config.train.num_steps + 1):
            if step == start + 1:
                writer.phase("compiling the train step")
            state, metrics = step_fn(state, frozen, global_batch(next(loader), batch_sh))
            if step == start + 1:
                writer.phase("training")
            if step % config.train.log_every == 0 or step == config.train.num_steps:
                line = writer.write(step, {**metrics, "skipped_records": loader.skipped})
                writer.progress(step, line, config.train.global_batch_size)
                _check_finite(line, config, step)
            if eval_batches and step % config.train.eval_every == 0:
                writer.phase("evaluating")
                writer.write(step, _mean_metrics(eval_fn(state, frozen, b) for b in eval_batches))
                writer.phase("training")
            if sample_eval and (step % config.eval.sample_every == 0 or step == config.train.num_steps):
                evaluate_samples(step)
            stop = ckpt.should_stop(step)
            regenerate = every and step % every == 0 and step < config.train.num_steps
            ckpt.save(step, state, loader.iterator, force=stop or regenerate or step == config.train.num_steps)
            if stop:
                ckpt.wait()
                raise Stopped(step, ckpt.stop_signal)
            if regenerate:  # a run killed while generating resumes from this checkpoint into the same round
                ckpt.wait()
                loader.close()
                loader = next_round(step)
        ckpt.wait()
    return {**line, **evaluated}


def _sample_eval(config: ml_collections.ConfigDict, setup: Setup, frozen: Any) -> Any:
    """Sampling eval against the frozen base on the world's held-out prompts, when config.eval asks for it."""
    if config.eval.sample_every <= 0:
        return None
    from pnapo_jax import evaluate

    return evaluate.SampleEval(setup, worlds.make_world(config), config.eval, reference_variables(setup, frozen))


def _mean_metrics(metrics: Iterator[Metrics]) -> dict[str, float]:
    ms = [jax.device_get(m) for m in metrics]
    return {f"eval/{k}": float(np.mean([m[k] for m in ms])) for k in ms[0]}

