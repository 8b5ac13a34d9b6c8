"""The package's layers point down only (issue 15): read from the source with `ast` (tests/import_map.py), counting
function-local imports too. `python -m tests.import_map` prints the map these assertions are about."""

import import_map


def test_every_module_has_a_layer():
    g = import_map.graph()
    assert [m for m in g if import_map.layer(m) is None] == []


def test_no_import_circle():
    assert import_map.cycles(import_map.graph()) == []


def test_no_arrow_points_up():
    assert import_map.upward(import_map.graph()) == []


def test_models_load_no_files_and_no_command_imports_the_loop():
    assert import_map.crossings(import_map.graph()) == []


def test_function_local_and_relative_imports_count():
    """The map sees an import inside a function (train's lazy `from pnapo_jax import report`) and skips
    `if TYPE_CHECKING:` blocks."""
    known = import_map.modules()
    assert "pnapo_jax.report" in import_map.imports_of("pnapo_jax.train", known)
    assert "pnapo_jax.train" not in import_map.imports_of("pnapo_jax.evaluate", known) or (
        "TYPE_CHECKING" not in known["pnapo_jax.evaluate"].read_text())


def test_no_source_cites_a_path_outside_the_repository():
    """The package's text names files by their place in the repository, never a machine's (/work/..., /home/...)."""
    cited = [f"{m}: {word}" for m, path in import_map.modules().items() for word in path.read_text().split()
             if word.strip("`'\"(),.").startswith(("/work/", "/home/", "/Users/", "/root/"))]
    assert cited == []


def test_the_run_config_and_its_check_import_no_model():
    """A backbone's model fields and checks come through pnapo_jax.backbones: config.py and config_check.py import
    no model module (adding a backbone edits neither)."""
    known = import_map.modules()
    for module in ("pnapo_jax.config", "pnapo_jax.config_check"):
        assert [m for m in import_map.imports_of(module, known)
                if m.startswith("pnapo_jax.models") or m == "pnapo_jax.backbones.flux"] == []
