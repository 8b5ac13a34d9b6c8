"""Bad invocations of every command, each classified by what the user sees: one line naming what is wrong, a
traceback, or a silent success. tests/test_cli.py runs it; alone it prints the table and the counts:

    python tests/cli_probe.py [--quick] [--json] [COMMAND_OR_CASE ...]

Every case fails early (a flag, a file, a config field), so one process per command imports the stack once and
forks a child per case (runpy as `python -m MODULE` would run it): seconds per case, not an import each.
"""

import dataclasses
import io
import json
import os
import runpy
import sys
import tempfile
import time
from collections.abc import Callable

TINY = "configs/tiny.py"
DEMO = "configs/demo_cpu.py:fast"


@dataclasses.dataclass(frozen=True)
class Case:
    """`python -m module *args` must end non-zero with one `error:` line that contains `names` (the flag,
    field or file it is about)."""

    name: str
    module: str
    args: tuple[str, ...]
    names: str


def _files(tmp: str) -> dict[str, str]:
    """Bad input files the cases name; created fresh per probe run."""
    def write(name: str, data: bytes | str) -> str:
        path = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return path

    workdir_json = json.dumps({"seed": 0})  # a config.json that is not a run's
    sd3_config = json.dumps({"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2,
                             "in_channels": 4, "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
                             "joint_attention_dim": 12, "caption_projection_dim": 16, "pooled_projection_dim": 10,
                             "out_channels": 4, "pos_embed_max_size": 12})
    flux_config = json.dumps({"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16,
                              "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                              "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                              "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]})
    weights = "diffusion_pytorch_model.safetensors"
    truncated = b'\xff\x00\x00\x00\x00\x00\x00\x00{"x": {"dtype": "F32"'
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pnapo_jax", "assets", "demo_base_sd3",
                           "config.json")) as fh:
        sd3_demo_config = fh.read()  # the shipped SD3 demo base's
    return {
        "blank_prompts": write("blank_prompts.txt", "a red cube\n\na blue ball\n"),
        "latin1_prompts": write("latin1_prompts.txt", b"a caf\xe9\n"),
        "empty_prompts": write("empty_prompts.txt", ""),
        "prompts": write("prompts.txt", "a red cube\n"),
        "not_a_dir": write("not_a_dir", "x"),
        "no_ckpt_workdir": os.path.dirname(write("no_ckpt/config.json", _tiny_config_json())),
        # a run to resume: its config.json and a checkpoint step folder (the resume check reads no more)
        "run_workdir": os.path.dirname(write("run/config.json", _tiny_config_json())),
        "run_checkpoint": os.path.dirname(write("run/checkpoints/8/.keep", "")),
        "bad_json_workdir": os.path.dirname(write("bad_json/config.json", "{not json")),
        "alien_json_workdir": os.path.dirname(write("alien_json/config.json", workdir_json)),
        "empty_workdir": os.path.dirname(write("empty_workdir/.keep", "")),
        "bad_manifest": write("bad_manifest.jsonl", '{"caption": "x", "label_0": 1}\n{not json\n'),
        "ties_manifest": write("ties_manifest.jsonl", '{"caption": "x", "label_0": 0.5}\n'),
        "missing_field_manifest": write("missing_field.jsonl", '{"caption": "x", "label_0": 1}\n'),
        "bad_label_manifest": write("bad_label.jsonl", '{"caption": "x", "label_0": 7}\n'),
        "pickle_pt": write("model.pt", b"\x80\x04not really a pickle"),
        "bad_config_py": write("bad_config.py", "def get_config():\n    return 1 / 0\n"),
        # weight folders: the other backbone's, a config.json that is not JSON, a pickle / a truncated header
        "sd3_transformer": os.path.dirname(write("sd3_transformer/config.json", sd3_config)),
        "flux_transformer": os.path.dirname(write("flux_transformer/config.json", flux_config)),
        "weights_bad_json": os.path.dirname(write("weights_bad_json/config.json", "{not json")),
        "weights_pickle": os.path.dirname(write(f"weights_pickle/{weights}", b"\x80\x04\x95 not safetensors")),
        "weights_truncated": os.path.dirname(write(f"weights_truncated/{weights}", truncated)),
        # an SD3 demo base with broken weights; a transformer folder of no backbone's class
        "sd3_demo_truncated": os.path.dirname([write(f"sd3_demo_truncated/{name}", data) for name, data in (
            ("config.json", sd3_demo_config), (weights, truncated))][0]),
        "unknown_class": os.path.dirname([write(f"unknown_class/{name}", data) for name, data in (
            ("config.json", json.dumps({"_class_name": "UNet2DConditionModel"})), (weights, truncated))][0]),
        "demo_renamed": os.path.join(tmp, "demo_renamed"),  # the demo base, one tensor renamed (`_weights`)
        "sd3_pipeline": os.path.dirname(write("sd3_pipeline/model_index.json", json.dumps(
            {"_class_name": "StableDiffusion3Pipeline"}))),
        "clip_scorer": os.path.dirname([write(f"clip_scorer/{n}", "{}") for n in (  # the files parse looks for
            "config.json", "model.safetensors", "tokenizer.json")][0]),
        **_built(tmp),
        "pipeline": os.path.dirname(os.path.dirname(  # the folders of a pipeline, empty: flags are checked first
            [write(f"pipeline/{p}/.keep", "") for p in ("transformer", "vae", "text_encoder", "text_encoder_2",
                                                         "tokenizer", "tokenizer_2", "scheduler")][0])),
    }


def _weights(f: dict[str, str]) -> None:
    """A tensor of each backbone's naming beside its config (what looks_like reads), a FLUX config beside the
    broken weight files, and the demo base with one tensor renamed."""
    import numpy as np
    import safetensors.numpy

    name = "diffusion_pytorch_model.safetensors"
    safetensors.numpy.save_file({"pos_embed.proj.weight": np.zeros((16, 4, 2, 2), np.float32)},
                                os.path.join(f["sd3_transformer"], name))
    for folder in ("flux_transformer", "weights_bad_json"):
        safetensors.numpy.save_file({"transformer_blocks.0.attn.to_q.weight": np.zeros((32, 32), np.float32)},
                                    os.path.join(f[folder], name))
    config = open(os.path.join(f["flux_transformer"], "config.json")).read()
    demo_base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pnapo_jax", "assets", "demo_base")
    mismatched(demo_base, f["demo_renamed"], "renamed", "proj_out.weight")
    for folder in ("weights_pickle", "weights_truncated"):
        with open(os.path.join(f[folder], "config.json"), "w") as fh:
            fh.write(config)


def _built(tmp: str) -> dict[str, str]:
    """Where `_build` writes: a tiny.py-shaped sextuple dataset and its data_dir (not the version dir), copies with
    a truncated shard and with a features file naming another module; tiny.py's weights, clean and with a NaN; and
    the run `_train` makes. Named here, written only when a selected case needs them (the quick cases do not)."""
    data_dir = os.path.join(tmp, "dataset")
    return {"dataset": os.path.join(data_dir, "pnapo_pairs", "1.0.0"), "dataset_data_dir": data_dir,
            "truncated_dataset": os.path.join(tmp, "truncated_dataset", "1.0.0"),
            "hostile_dataset": os.path.join(tmp, "hostile_dataset", "1.0.0"),
            "weights_nan": os.path.join(tmp, "weights_nan"), "weights_tiny": os.path.join(tmp, "weights_tiny"),
            **{f"weights_{case}": os.path.join(tmp, f"weights_{case}") for case in MISMATCHES},
            "trained": os.path.join(tmp, "trained")}


def _build(f: dict[str, str]) -> None:
    """Writes `_built`'s dataset and weights, in a forked child: TFDS's and array_record's threads in this process
    would not survive the forks of the cases."""
    import shutil

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from pnapo_jax.data.builder import write_dataset
            from pnapo_jax.data.synthetic import synthetic_pairs

            pairs = synthetic_pairs(8, image_tokens=16, channels=16, text_len=8, text_dim=32, pooled_dim=16, seed=0)
            write_dataset(pairs.records, pairs.spec, f["dataset_data_dir"])
            _tiny_weights(f["weights_nan"], nan=True)
            _tiny_weights(f["weights_tiny"])
            code = 0
        finally:
            os._exit(code)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) or not os.path.isdir(f["dataset"]):
        raise RuntimeError(f"writing the probe's dataset {f['dataset']} and weights failed")
    for case in MISMATCHES:
        mismatched(f["weights_tiny"], f[f"weights_{case}"], case, "proj_out.bias")
    shutil.copytree(f["dataset"], f["truncated_dataset"])
    shard = sorted(p for p in os.listdir(f["truncated_dataset"]) if ".array_record" in p)[0]
    shard = os.path.join(f["truncated_dataset"], shard)
    os.truncate(shard, os.path.getsize(shard) // 2)
    shutil.copytree(f["dataset"], f["hostile_dataset"])
    features = os.path.join(f["hostile_dataset"], "features.json")
    spec = json.loads(open(features).read())
    spec["pythonClassName"] = "subprocess.Popen"
    with open(features, "w") as fh:
        fh.write(json.dumps(spec))


MISMATCHES = ("dropped", "renamed", "reshaped")  # what `mismatched` does to a tensor


def mismatched(src: str, dst: str, case: str, key: str) -> None:
    """A copy of weights folder `src` in which tensor `key` is dropped, renamed (`key` + `_renamed`) or reshaped
    (one row more), its config.json untouched: tensors that do not match the config."""
    import shutil

    import numpy as np
    import safetensors.numpy

    shutil.copytree(src, dst)
    file = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    x = tensors.pop(key)
    if case == "renamed":
        tensors[f"{key}_renamed"] = x
    elif case == "reshaped":
        tensors[key] = np.zeros((x.shape[0] + 1, *x.shape[1:]), x.dtype)
    safetensors.numpy.save_file(tensors, file)


def _tiny_weights(folder: str, nan: bool = False) -> None:
    """tiny.py's transformer as a diffusers folder (zeros; with `nan`, one weight NaN)."""
    import jax
    import numpy as np

    from pnapo_jax import convert
    from pnapo_jax.models import flux

    cfg = flux.FluxConfig.from_diffusers(dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)))
    shapes = jax.eval_shape(lambda: flux.nn.meta.unbox(flux.init_params(cfg, jax.random.key(0))))
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    params["proj_out"]["kernel"][0, 0] = np.nan if nan else 0.0
    convert.save_diffusers_transformer(cfg, params, folder)


def _train(workdir: str, pretrained: str) -> None:
    """A finished 2-step tiny.py run from `pretrained`, for the cases about a run's workdir (a minute on 2 cores)."""
    import subprocess

    subprocess.run([sys.executable, "-m", "pnapo_jax.main", f"--config={TINY}", f"--workdir={workdir}", "--noprogress",
                    "--config.train.num_steps=2", "--config.checkpoint.every_steps=2",
                    f"--config.model.pretrained={pretrained}"], check=True, capture_output=True)


def _tiny_config_json() -> str:
    sys.path.insert(0, "configs")
    import tiny

    return tiny.get_config().to_json_best_effort()


def cases(f: dict[str, str], tmp: str) -> list[Case]:
    out = os.path.join(tmp, "out")
    wd = os.path.join(tmp, "wd")  # never written by a case that fails as it should

    def main(name: str, names: str, *a: str) -> Case:  # a case that is not refused trains 2 steps, in its own workdir
        workdir = os.path.join(tmp, name.replace("/", "_"))
        return Case(name, "pnapo_jax.main", (f"--config={TINY}", f"--workdir={workdir}", "--noprogress",
                                            "--config.train.num_steps=2", *a), names)

    gen = lambda name, names, *a: Case(name, "pnapo_jax.generate", (f"--config={DEMO}", *a), names)
    export = lambda name, names, *a: Case(name, "pnapo_jax.export", a, names)
    sample = lambda name, names, *a: Case(name, "pnapo_jax.sample", a, names)
    aot = lambda name, names, *a: Case(name, "pnapo_jax.aot", (f"--config={TINY}", *a), names)
    imp = lambda name, names, *a: Case(name, "pnapo_jax.data.import_pairs", a, names)
    sweep = lambda name, names, *a: Case(name, "pnapo_jax.sweep", a, names)
    ev = lambda name, names, *a: Case(name, "pnapo_jax.evaluate", a, names)
    demo_model = "base=pnapo_jax/assets/demo_base"  # the shipped demo base: the flags after it are what is wrong
    nowhere = os.path.join(tmp, "nonexistent")
    pipe = f"--pipeline={f['pipeline']}"  # the flags and files after it are what is wrong
    return [
        Case("main/no_flags", "pnapo_jax.main", (), "--config"),
        Case("main/missing_config_file", "pnapo_jax.main", (f"--config={nowhere}.py", f"--workdir={wd}"),
             "nonexistent.py"),
        Case("main/config_file_raises", "pnapo_jax.main", (f"--config={f['bad_config_py']}", f"--workdir={wd}"),
             "bad_config.py"),
        Case("main/unknown_variant", "pnapo_jax.main", (f"--config={TINY}:big", f"--workdir={wd}"), "big"),
        main("main/extra_argument", "unexpected", "extra"),
        main("main/ill_typed_value", "num_steps", "--config.train.num_steps=abc"),
        main("main/unknown_field", "nmu_steps", "--config.train.nmu_steps=5"),
        main("main/num_steps_zero", "config.train.num_steps", "--config.train.num_steps=0"),
        main("main/noise_mode", "config.pnapo.noise_mode", "--config.pnapo.noise_mode=bogus"),
        main("main/scale_convention", "config.pnapo.scale_convention", "--config.pnapo.scale_convention=x"),
        main("main/schedule", "config.optim.schedule", "--config.optim.schedule=linear"),
        main("main/remat", "config.model.remat_policy", "--config.model.remat_policy=some"),
        main("main/attention_impl", "config.model.attention_impl", "--config.model.attention_impl=flash"),
        main("main/t_sampling", "config.t_sampling.kind", "--config.t_sampling.kind=normal"),
        main("main/pretrained_format", "config.model.pretrained_format", "--config.model.pretrained_format=ckpt"),
        main("main/reference_dtype", "config.model.reference_dtype", "--config.model.reference_dtype=f32"),
        main("main/batch_vs_accum", "config.train.grad_accum_steps", "--config.train.grad_accum_steps=3"),
        main("main/batch_vs_mesh", "config.train.global_batch_size", "--config.train.global_batch_size=4"),
        main("main/mesh_devices", "config.mesh", "--config.mesh.data=3"),
        main("main/every_steps_zero", "config.checkpoint.every_steps", "--config.checkpoint.every_steps=0"),
        main("main/keep_zero", "config.checkpoint.keep", "--config.checkpoint.keep=0"),
        main("main/log_every_zero", "config.train.log_every", "--config.train.log_every=0"),
        main("main/eval_every_negative", "config.train.eval_every", "--config.train.eval_every=-1"),
        main("main/lora_rank_negative", "config.lora.rank", "--config.lora.rank=-1"),
        main("main/lora_target_unknown", "config.lora.targets", "--config.lora.rank=4",
             "--config.lora.targets=to_qq"),
        main("main/beta_zero", "config.pnapo.beta", "--config.pnapo.beta=0"),
        main("main/tau_zero", "config.pnapo.tau", "--config.pnapo.tau=0"),
        main("main/n2_below_n1", "config.pnapo.n2", "--config.pnapo.n1=12", "--config.pnapo.n2=4"),
        main("main/lr_negative", "config.optim.lr", "--config.optim.lr=-1"),
        main("main/on_bad_record", "config.data.on_bad_record", "--config.data.on_bad_record=ignore"),
        main("main/data_source", "config.data.source", "--config.data.source=parquet"),
        main("main/pair_mode", "config.generate.pairs", "--config.generate.pairs=best"),
        main("main/world", "config.generate.world", "--config.generate.world=sd3"),
        main("main/source_without_path", "config.data.path", "--config.data.source=array_record"),
        main("main/eval_split", "config.eval.split", "--config.eval.sample_every=4", "--config.eval.split=test"),
        main("main/missing_pretrained", "config.model.pretrained", f"--config.model.pretrained={nowhere}"),
        main("main/missing_data_path", "config.data.path", "--config.data.source=array_record",
             f"--config.data.path={nowhere}"),
        main("main/axes_dims_rope", "config.model.axes_dims_rope", "--config.model.attention_head_dim=20"),
        Case("main/empty_workdir", "pnapo_jax.main", (f"--config={TINY}", "--workdir="), "--workdir"),
        *[Case(f"main/resume_changed_{field.rsplit('.', 1)[-1]}", "pnapo_jax.main", (
            f"--config={TINY}", f"--workdir={f['run_workdir']}", "--noprogress", f"--{field}={value}"), field)
          for field, value in (("config.seed", 5), ("config.model.num_layers", 2),
                               ("config.train.global_batch_size", 16))],
        main("main/pretrained_nan", "weights_nan", f"--config.model.pretrained={f['weights_nan']}"),
        # the tiny weights with one tensor dropped, renamed, reshaped: the folder, the kind of mismatch, the tensor
        *[main(f"main/pretrained_tensor_{case}", f"weights_{case} does not match the model config: {kind} (1): "
               "proj_out.bias", f"--config.model.pretrained={f[f'weights_{case}']}")
          for case, kind in zip(MISMATCHES, ("missing tensors", "missing tensors", "wrong shapes"), strict=True)],
        # weights (issue 13 item 13) and the other backbone's folder
        main("main/pretrained_sd3_folder", "sd3_transformer", f"--config.model.pretrained={f['sd3_transformer']}"),
        Case("main/sd3_run_flux_folder", "pnapo_jax.main", (
            "--config=configs/sd3_tpu.py", f"--workdir={os.path.join(tmp, 'sd3_run')}", "--noprogress",
            "--config.data.source=synthetic", "--config.model.attention_impl=xla",
            f"--config.model.pretrained={f['flux_transformer']}"), "flux_transformer"),
        main("main/pretrained_config_not_json", "weights_bad_json",
             f"--config.model.pretrained={f['weights_bad_json']}"),
        main("main/pretrained_pickle", "weights_pickle", f"--config.model.pretrained={f['weights_pickle']}"),
        main("main/pretrained_truncated", "weights_truncated", f"--config.model.pretrained={f['weights_truncated']}"),
        main("main/hub_id_not_cached", "black-forest-labs/FLUX.1-dev",
             "--config.model.pretrained=black-forest-labs/FLUX.1-dev"),
        main("main/lora_targets_from_flags", "config.lora.targets", "--config.lora.rank=4",
             "--config.lora.targets=('to_q','nope')"),
        # data (item 12)
        main("main/data_dir_not_version_dir", "dataset", "--config.data.source=array_record",
             f"--config.data.path={f['dataset_data_dir']}"),
        main("main/truncated_dataset", "truncated_dataset", "--config.data.source=array_record",
             f"--config.data.path={f['truncated_dataset']}"),
        main("main/features_names_a_module", "hostile_dataset", "--config.data.source=array_record",
             f"--config.data.path={f['hostile_dataset']}"),
        main("main/dataset_wrong_shape", "'text_len'", "--config.data.source=array_record",
             f"--config.data.path={f['dataset']}", "--config.data.text_len=9"),
        Case("generate/no_flags", "pnapo_jax.generate", (), "--config"),
        gen("generate/missing_prompts", "nonexistent", f"--prompts={nowhere}.txt", f"--out={out}"),
        gen("generate/blank_prompt", "blank_prompts.txt", f"--prompts={f['blank_prompts']}", f"--out={out}"),
        gen("generate/not_utf8", "latin1_prompts.txt", f"--prompts={f['latin1_prompts']}", f"--out={out}"),
        gen("generate/no_prompts", "empty_prompts.txt", f"--prompts={f['empty_prompts']}", f"--out={out}"),
        gen("generate/prompts_is_dir", tmp, f"--prompts={tmp}", f"--out={out}"),
        gen("generate/out_is_file", "not_a_dir", f"--prompts={f['prompts']}", f"--out={f['not_a_dir']}"),
        gen("generate/world", "config.generate.world", f"--prompts={f['prompts']}", f"--out={out}",
            "--config.generate.world=sd3"),
        gen("generate/pairs", "config.generate.pairs", f"--prompts={f['prompts']}", f"--out={out}",
            "--config.generate.pairs=best"),
        gen("generate/one_image", "config.generate.images_per_prompt", f"--prompts={f['prompts']}",
            f"--out={out}", "--config.generate.images_per_prompt=1"),
        gen("generate/extra_argument", "unexpected", f"--prompts={f['prompts']}", f"--out={out}", "extra"),
        Case("export/no_flags", "pnapo_jax.export", (), "--workdir"),
        export("export/missing_workdir", "nonexistent", f"--workdir={nowhere}", f"--out={out}"),
        export("export/workdir_without_config", "empty_workdir", f"--workdir={f['empty_workdir']}", f"--out={out}"),
        export("export/config_not_json", "bad_json", f"--workdir={f['bad_json_workdir']}", f"--out={out}"),
        export("export/config_not_a_run", "alien_json", f"--workdir={f['alien_json_workdir']}", f"--out={out}"),
        export("export/no_checkpoints", "checkpoints", f"--workdir={f['no_ckpt_workdir']}", f"--out={out}"),
        export("export/step_not_int", "--step", f"--workdir={f['no_ckpt_workdir']}", f"--out={out}", "--step=x"),
        export("export/step_negative", "--step", f"--workdir={f['no_ckpt_workdir']}", f"--out={out}", "--step=-3"),
        export("export/format", "--format", f"--workdir={f['no_ckpt_workdir']}", f"--out={out}", "--format=onnx"),
        export("export/lora_of_full", "--format=lora", f"--workdir={f['no_ckpt_workdir']}", f"--out={out}",
               "--format=lora"),
        export("export/out_is_the_runs_pretrained", "weights_tiny", f"--workdir={f['trained']}",
               f"--out={f['weights_tiny']}"),
        export("export/step_not_saved", "999", f"--workdir={f['trained']}", f"--out={out}", "--step=999"),
        export("export/lora_of_full_run", "--format=lora", f"--workdir={f['trained']}", f"--out={out}",
               "--format=lora"),
        Case("sample/no_flags", "pnapo_jax.sample", (), "--out"),  # --pipeline is optional (the demo base)
        sample("sample/missing_pipeline", "nonexistent", f"--pipeline={nowhere}", "--prompt=x",
               f"--out={out}.png"),
        sample("sample/pipeline_is_file", "not_a_dir", f"--pipeline={f['not_a_dir']}", "--prompt=x",
               f"--out={out}.png"),
        sample("sample/prompt_and_prompts", "prompt", f"--pipeline={nowhere}", "--prompt=x",
               f"--prompts={f['prompts']}", f"--out={out}"),
        sample("sample/missing_prompts", "nonexistent.txt", pipe, f"--prompts={nowhere}.txt", f"--out={out}"),
        sample("sample/blank_prompt", "blank_prompts.txt", pipe, f"--prompts={f['blank_prompts']}", f"--out={out}"),
        sample("sample/no_prompts", "empty_prompts.txt", pipe, f"--prompts={f['empty_prompts']}", f"--out={out}"),
        sample("sample/step_without_workdir", "--step", pipe, "--prompt=x", f"--out={out}.png", "--step=5"),
        sample("sample/missing_noise", "nonexistent.npy", pipe, "--prompt=x", f"--out={out}.png",
               f"--noise={nowhere}.npy"),
        sample("sample/missing_workdir", "nonexistent", pipe, "--prompt=x", f"--out={out}.png",
               f"--workdir={nowhere}"),
        sample("sample/num_steps", "--num_steps", pipe, "--prompt=x", f"--out={out}.png", "--num_steps=0"),
        sample("sample/workdir_without_config", "empty_workdir", "--prompt=x", f"--out={out}.png",
               f"--workdir={f['empty_workdir']}"),
        sample("sample/workdir_config_not_json", "bad_json", "--prompt=x", f"--out={out}.png",
               f"--workdir={f['bad_json_workdir']}"),
        sample("sample/workdir_not_a_run", "alien_json", "--prompt=x", f"--out={out}.png",
               f"--workdir={f['alien_json_workdir']}"),
        sample("sample/workdir_no_checkpoints", "checkpoints", "--prompt=x", f"--out={out}.png",
               f"--workdir={f['no_ckpt_workdir']}"),
        sample("sample/workdir_is_file", "not_a_dir", "--prompt=x", f"--out={out}.png",
               f"--workdir={f['not_a_dir']}"),
        sample("sample/sd3_transformer_as_pipeline", "sd3_transformer", f"--pipeline={f['sd3_transformer']}",
               "--prompt=x", f"--out={out}.png"),
        sample("sample/sd3_demo_truncated_weights", "sd3_demo_truncated/diffusion_pytorch_model.safetensors",
               f"--pipeline={f['sd3_demo_truncated']}", "--prompt=x", f"--out={out}.png"),
        sample("sample/pipeline_tensor_renamed", "demo_renamed does not match the model config: missing tensors (1): "
               "proj_out.weight; unexpected tensors (1): proj_out.weight_renamed", f"--pipeline={f['demo_renamed']}",
               "--prompt=x", f"--out={out}.png"),
        sample("sample/unknown_transformer_class", "UNet2DConditionModel", f"--pipeline={f['unknown_class']}",
               "--prompt=x", f"--out={out}.png"),
        sample("sample/sd3_demo_beyond_its_positions", "--height", "--pipeline=pnapo_jax/assets/demo_base_sd3",
               "--prompt=x", f"--out={out}.png", "--height=64"),
        sample("sample/pipeline_without_parts", "sd3_pipeline", f"--pipeline={f['sd3_pipeline']}", "--prompt=x",
               f"--out={out}.png"),
        sample("sample/run_step_not_saved", "999", "--prompt=x", f"--out={out}.png", f"--workdir={f['trained']}",
               "--step=999"),
        sample("sample/run_of_another_model", "trained", "--prompt=x", f"--out={out}.png",
               f"--workdir={f['trained']}"),
        sample("sample/height", "--height", "--prompt=x", f"--out={out}.png", "--height=-8"),
        sample("sample/batch_size", "--batch_size", "--prompt=x", f"--out={out}.png", "--batch_size=0"),
        sample("sample/dtype", "--dtype", pipe, "--prompt=x", f"--out={out}.png", "--dtype=f16"),
        Case("evaluate/no_flags", "pnapo_jax.evaluate", (), "--models"),
        ev("evaluate/missing_model", "nonexistent", f"--models=a={nowhere}", f"--prompts={f['prompts']}",
           f"--out={out}"),
        ev("evaluate/models_not_name_path", "--models", "--models=pnapo_jax/assets/demo_base",
           f"--prompts={f['prompts']}", f"--out={out}"),
        ev("evaluate/sd3_transformer", "sd3_transformer", f"--models=a={f['sd3_transformer']}",
           f"--prompts={f['prompts']}", f"--out={out}"),
        ev("evaluate/model_tensor_renamed", "demo_renamed does not match the model config",
           f"--models=a={f['demo_renamed']}", f"--prompts={f['prompts']}", f"--out={out}"),
        ev("evaluate/missing_prompts", "nonexistent.txt", f"--models={demo_model}", f"--prompts={nowhere}.txt",
           f"--out={out}"),
        ev("evaluate/blank_prompt", "blank_prompts.txt", f"--models={demo_model}", f"--prompts={f['blank_prompts']}",
           f"--out={out}"),
        ev("evaluate/unknown_scorer", "--scorers", f"--models={demo_model}", f"--prompts={f['prompts']}",
           f"--out={out}", "--scorers=bogus"),
        ev("evaluate/world", "--world", f"--models={demo_model}", f"--prompts={f['prompts']}", f"--out={out}",
           "--world=sd3"),
        ev("evaluate/seeds_zero", "--seeds", f"--models={demo_model}", f"--prompts={f['prompts']}", f"--out={out}",
           "--seeds=0"),
        ev("evaluate/num_steps_zero", "--num_steps", f"--models={demo_model}", f"--prompts={f['prompts']}",
           f"--out={out}", "--num_steps=0"),
        ev("evaluate/batch_size_zero", "--batch_size", f"--models={demo_model}", f"--prompts={f['prompts']}",
           f"--out={out}", "--batch_size=0"),
        ev("evaluate/baseline_unknown", "--baseline", f"--models={demo_model}", f"--prompts={f['prompts']}",
           f"--out={out}", "--baseline=nobody"),
        ev("evaluate/prompt_format", "--prompt_format", f"--models={demo_model}", f"--prompts={f['prompts']}",
           f"--out={out}", "--prompt_format=xml"),
        ev("evaluate/run_step_not_saved", "999", f"--models=a={f['trained']}@999", f"--prompts={f['prompts']}",
           f"--out={out}"),
        ev("evaluate/out_is_file", "not_a_dir", f"--models={demo_model}", f"--prompts={f['prompts']}",
           f"--out={f['not_a_dir']}"),
        ev("evaluate/flux_world_sd3_pipeline", "sd3_pipeline", f"--models=a={f['flux_transformer']}",
           f"--prompts={f['prompts']}", f"--out={out}", "--world=flux", f"--pipeline={f['sd3_pipeline']}",
           f"--scorers=clip_score={f['clip_scorer']}"),
        Case("aot/no_flags", "pnapo_jax.aot", (), "--config"),
        aot("aot/unknown_topology", "v9-8", "--topology=v9-8"),
        aot("aot/bad_topology_syntax", "--topology", "--topology=tpu"),
        aot("aot/bad_config_field", "config.pnapo.noise_mode", "--topology=v5p-8", "--config.pnapo.noise_mode=x"),
        aot("aot/hbm_negative", "--hbm_gib", "--topology=v5p-8", "--hbm_gib=-1"),
        aot("aot/odd_chip_count", "v5p-7", "--topology=v5p-7"),
        aot("aot/slice_two_dims", "v5p:2x2", "--topology=v5p:2x2"),
        aot("aot/zero_chips", "v6e-0", "--topology=v6e-0"),
        aot("aot/generation_batch", "--generation_batch", "--topology=v5p-8", "--generation",
            "--generation_batch=-1"),
        Case("import_pairs/no_flags", "pnapo_jax.data.import_pairs", (), "--input"),
        imp("import_pairs/missing_manifest", "nonexistent", f"--input={nowhere}.jsonl", f"--out={out}"),
        imp("import_pairs/not_json", "bad_manifest.jsonl", f"--input={f['bad_manifest']}", f"--out={out}"),
        imp("import_pairs/only_ties", "ties_manifest.jsonl", f"--input={f['ties_manifest']}", f"--out={out}"),
        imp("import_pairs/missing_field", "missing_field.jsonl", f"--input={f['missing_field_manifest']}",
            f"--out={out}"),
        imp("import_pairs/bad_label", "label_0", f"--input={f['bad_label_manifest']}", f"--out={out}"),
        imp("import_pairs/missing_vae", "nonexistent", f"--input={f['missing_field_manifest']}", f"--out={out}",
            f"--vae={nowhere}"),
        imp("import_pairs/height", "--height", f"--input={f['missing_field_manifest']}", f"--out={out}",
            "--height=abc"),
        Case("sweep/no_flags", "pnapo_jax.sweep", (), "--config"),
        sweep("sweep/missing_config", "nonexistent.py", f"--config={nowhere}.py", f"--workdir={wd}",
              "--grid=pnapo.beta=1,2", "--dry-run"),
        sweep("sweep/unknown_key", "pnapo.bta", f"--config={TINY}", f"--workdir={wd}", "--grid=pnapo.bta=1,2",
              "--dry-run"),
        sweep("sweep/bad_grid", "--grid", f"--config={TINY}", f"--workdir={wd}", "--grid=pnapo.beta", "--dry-run"),
        sweep("sweep/bad_value", "config.pnapo.noise_mode", f"--config={TINY}", f"--workdir={wd}",
              "--grid=pnapo.noise_mode=a,b", "--dry-run"),
        Case("convert_open_clip/no_flags", "pnapo_jax.rewards.convert_open_clip", (), "--in"),
        Case("convert_open_clip/missing_in", "pnapo_jax.rewards.convert_open_clip",
             (f"--in={nowhere}.pt", f"--out={out}.safetensors"), "nonexistent.pt"),
        Case("convert_open_clip/not_a_checkpoint", "pnapo_jax.rewards.convert_open_clip",
             (f"--in={f['pickle_pt']}", f"--out={out}.safetensors"), "model.pt"),
        Case("world.pretrain/extra_argument", "pnapo_jax.world.pretrain", (f"--out={out}", "extra"), "unexpected"),
        Case("world.pretrain/steps", "pnapo_jax.world.pretrain", (f"--out={out}", "--steps=0"), "--steps"),
        Case("world.reflow/no_out", "pnapo_jax.world.reflow", (), "--out"),
        Case("world.reflow/missing_base", "pnapo_jax.world.reflow", (f"--base={nowhere}", f"--out={out}"),
             "nonexistent"),
        Case("world.straightness/no_out", "pnapo_jax.world.straightness", (), "--out"),
        Case("world.straightness/missing_base", "pnapo_jax.world.straightness",
             (f"--base={nowhere}", f"--out={out}"), "nonexistent"),
        Case("world.straightness/num_steps", "pnapo_jax.world.straightness", (f"--out={out}", "--num_steps=x"),
             "--num_steps"),
    ]


# One process runs these in seconds: the default test suite's share (tests/test_cli.py); the rest run as slow.
QUICK = ("main/no_flags", "main/missing_config_file", "main/extra_argument", "main/num_steps_zero",
         "main/noise_mode", "main/batch_vs_mesh", "main/n2_below_n1", "generate/blank_prompt", "export/missing_workdir",
         "sample/missing_pipeline", "aot/unknown_topology", "import_pairs/not_json", "sweep/missing_config",
         "convert_open_clip/missing_in", "world.reflow/missing_base")


def classify(rc: int, output: str, names: str) -> str:
    """one_line: non-zero exit, no traceback, the last line `error: ...` naming `names`; unnamed: the same
    without the name; traceback; accepted: exit 0 (bad input taken); other: anything else."""
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "Traceback (most recent call last)" in output:
        return "traceback"
    if rc == 0:
        return "accepted"
    if last.startswith("error: ") or ": error: " in last:  # ours, argparse's
        return "one_line" if names in last else "unnamed"
    return "other"


def _run_child(case: Case, log: str) -> None:
    """In a forked child: `python -m case.module *case.args` with stdout and stderr into `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout, sys.stderr = io.TextIOWrapper(os.fdopen(1, "wb", 0)), io.TextIOWrapper(os.fdopen(2, "wb", 0))
    code = 0
    try:
        sys.argv = [case.module, *case.args]
        sys.modules.pop(case.module, None)
        runpy.run_module(case.module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = 1 if isinstance(e.code, str) else (e.code or 0)
    except BaseException:  # what the interpreter would print
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cases(selected: list[Case], tmp: str, on_result: Callable[[str, dict], None] | None = None,
              timeout_s: float = float(os.environ.get("CLI_PROBE_TIMEOUT", 300))) -> dict[str, dict]:
    """{case name: {outcome, rc, last line, seconds}}; each case in a forked child of this process."""
    results = {}
    for case in selected:
        log = os.path.join(tmp, case.name.replace("/", "_") + ".log")
        start = time.time()
        pid = os.fork()
        if pid == 0:
            _run_child(case, log)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.time() - start > timeout_s:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                rc = None
                break
            time.sleep(0.05)
        with open(log, errors="replace") as fh:
            output = fh.read()
        lines = [line for line in output.splitlines() if line.strip()]
        outcome = "timeout" if rc is None else classify(rc, output, case.names)
        results[case.name] = {"outcome": outcome, "rc": rc, "last": lines[-1][:300] if lines else "",
                              "lines": len(lines), "seconds": round(time.time() - start, 1)}
        if on_result:
            on_result(case.name, results[case.name])
    return results


def _preimport() -> None:
    """The heavy stack, once, before forking: the command modules too, except main and aot, which define their
    flags on import (runpy executes each command module afresh per case)."""
    import flax.linen  # noqa: F401
    import jax  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401

    import pnapo_jax.data.import_pairs  # noqa: F401
    import pnapo_jax.data.pipeline  # noqa: F401
    import pnapo_jax.evaluate  # noqa: F401
    import pnapo_jax.export  # noqa: F401
    import pnapo_jax.generate  # noqa: F401
    import pnapo_jax.rewards.convert_open_clip  # noqa: F401
    import pnapo_jax.sample  # noqa: F401
    import pnapo_jax.sweep  # noqa: F401
    import pnapo_jax.world.reflow  # noqa: F401
    import pnapo_jax.world.straightness  # noqa: F401


def probe(selection: list[str] | None = None, on_result: Callable[[str, dict], None] | None = None
          ) -> dict[str, dict]:
    """Run the cases named in `selection` or of the commands it names ('main', 'sample'; default: all)."""
    with tempfile.TemporaryDirectory(prefix="cli_probe_") as tmp:
        files = _files(tmp)
        _weights(files)
        all_cases = cases(files, tmp)
        selected = [c for c in all_cases if selection is None or {c.name, c.name.split("/")[0]} & set(selection)]
        needs = lambda paths: any(path in arg for path in paths for c in selected for arg in c.args)
        if needs(_built(tmp).values()):
            _build(files)
        if needs([files["trained"]]):
            _train(files["trained"], files["weights_tiny"])
        _preimport()
        return run_cases(selected, tmp, on_result)


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # as the tests run
    args = [a for a in sys.argv[1:] if not a.startswith("--")] + list(QUICK) * ("--quick" in sys.argv)
    show = lambda name, r: print(f"{r['outcome']:9} {name:40} rc={r['rc']} {r['seconds']:5}s  {r['last'][:150]}",
                                 flush=True)
    results = probe(args or None, None if "--json" in sys.argv else show)
    if "--json" in sys.argv:
        print(json.dumps(results))
        return
    counts = {}
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
