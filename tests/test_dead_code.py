"""No public name of the package is there for tests only (issue 15): a helper only tests call is a second path
beside the one runs take. `python tests/dead_code.py` prints what these assertions are about."""

import dead_code

KNOWN = {"pnapo_jax", "pnapo_jax.models", "pnapo_jax.models.t5", "pnapo_jax.objective", "pnapo_jax.convert",
         "pnapo_jax.convert.hf"}


def test_no_public_name_only_tests_use():
    assert dead_code.unused() == []


def test_every_allowed_name_exists_and_says_why():
    defined = {f"{m}.{name}" for m, path in dead_code.modules().items()
               for name, _ in dead_code.definitions(dead_code.ast.parse(path.read_text()))}
    assert [k for k, why in dead_code.ALLOWED.items() if k not in defined or not why.strip()] == []


def test_references_resolve_through_imports_not_by_name():
    """`from m import f`, `alias.f`, `pnapo_jax.m:f` strings reach m.f; a same-named local elsewhere does not."""
    source = """
from pnapo_jax import objective
from pnapo_jax.models import t5 as text_model
import pnapo_jax.convert.hf
from pnapo_jax.objective import pair_loss
objective.dynamic_beta(1.0)
text_model.T5Config
pnapo_jax.convert.hf.read_config
spec = "pnapo_jax.objective:make_pair_inputs"
def preference_losses(): ...
"""
    found = dead_code.uses("pnapo_jax.other", source, KNOWN)
    reached = {(m, n) for m, n in found if m in KNOWN}
    assert {("pnapo_jax.objective", n) for n in ("pair_loss", "dynamic_beta", "make_pair_inputs")} <= reached
    assert {("pnapo_jax.models.t5", "T5Config"), ("pnapo_jax.convert.hf", "read_config")} <= reached
    assert ("pnapo_jax.objective", "preference_losses") not in reached


def test_a_module_passed_as_a_value_reaches_the_attributes_read_from_it():
    """hf._load(folder, ..., t5, ...) reads `model.init_params`: t5.init_params is used although never named."""
    found = dead_code.uses("pnapo_jax.convert.hf", "from pnapo_jax.models import t5\nload(t5)\nmodel.init_params",
                           KNOWN)
    assert ("pnapo_jax.models.t5", dead_code.PASSED) in found and (dead_code.DYNAMIC, "init_params") in found
    assert ("pnapo_jax.models.t5", dead_code.PASSED) not in dead_code.uses(
        "pnapo_jax.convert.hf", "from pnapo_jax.models import t5\nt5.T5Config", KNOWN)
