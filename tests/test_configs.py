"""Every config file loads, its variants apply, and its model config is valid."""

import sys

import pytest
from etils import epath

from pnapo_jax import train

CONFIGS = epath.Path(__file__).parent.parent / "configs"
sys.path.insert(0, str(CONFIGS))
import flux_tpu  # noqa: E402
import tiny  # noqa: E402


@pytest.mark.parametrize("arg", ["", "lora", "independent", "static_beta", "lora,independent"])
def test_flux_tpu_variants(arg):
    c = flux_tpu.get_config(arg)
    cfg = train.flux_config(c)
    assert (cfg.num_layers, cfg.num_single_layers, cfg.inner_dim, cfg.guidance_embeds) == (19, 38, 3072, True)
    assert c.pnapo.beta == 2000.0 and c.optim.lr == (1e-5 if "lora" in arg else 1e-6)
    assert (cfg.lora_rank > 0) == ("lora" in arg)
    assert c.pnapo.noise_mode == ("independent" if "independent" in arg else "recorded")
    assert c.pnapo.use_gap == (arg != "static_beta")


def test_unknown_variants_fail_clearly():
    with pytest.raises(ValueError, match="unknown variants"):
        flux_tpu.get_config("lroa")
    with pytest.raises(ValueError, match="unknown variant"):
        tiny.get_config("big")


def test_every_field_is_commented():
    """The defaults file documents each field on its line; a section on its header's preceding comment line."""
    lines = (epath.Path(train.__file__).parent / "config.py").read_text().splitlines()
    for i, line in enumerate(lines):
        if not (line.startswith("    c.") and " = " in line):
            continue
        is_section = line.split(" = ")[0].count(".") == 1 and "ConfigDict(" in line
        assert ("#" in line) or (is_section and lines[i - 1].strip().startswith("#")), line


@pytest.mark.parametrize("arg", ["", "independent", "static_beta", "fast", "fast,independent"])
def test_demo_cpu_variants_match_the_shipped_base(arg):
    import demo_cpu

    c = demo_cpu.get_config(arg)
    assert epath.Path(c.model.pretrained, "config.json").exists()  # the base ships inside the package
    assert train.flux_config(c).in_channels == 12 and c.data.source == "generate"
    assert c.pnapo.noise_mode == ("independent" if "independent" in arg else "recorded")
