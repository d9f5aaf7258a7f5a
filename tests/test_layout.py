"""The package layout holds: stages import only what the dependency rule allows, every package ships in the wheel,
and the kernel library's default path points at the CMake build (else the kernel tests would silently skip)."""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ("awq_edge", "awq_edge.errors", "awq_edge.outputs", "awq_edge.quant", "awq_edge.packing", "awq_edge.arch",
        "awq_edge.data")
# Each stage's modules may import the base, their own stage and these; data flows one way, quantise -> export ->
# build -> run, and every artefact is read through its one owner.
ALLOWED = {
    "awq_edge.checkpoint": (),
    "awq_edge.quantizer": ("awq_edge.checkpoint",),
    "awq_edge.export": ("awq_edge.checkpoint",),
    "awq_edge.engine": ("awq_edge.export.folder",),
    "awq_edge.runtime": ("awq_edge.checkpoint", "awq_edge.export.folder", "awq_edge.engine.manifest"),
}
# The edges against the flow, each for a reason: QuantizedModel.export() is the API's one-call export; the default
# export calibrates its 4-bit head on the quantiser's calibration text (and its CLI names the sources).
EXCEPTIONS = {
    ("awq_edge.quantizer.api", "awq_edge.export.api"),
    ("awq_edge.export.head", "awq_edge.quantizer.calib"),
    ("awq_edge.export.cli", "awq_edge.quantizer.calib"),
}


def module_files():
    for path in sorted((ROOT / "awq_edge").rglob("*.py")):
        yield ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path
    for path in sorted((ROOT / "export").glob("*.py")):
        yield f"awq_edge.export.{path.stem}".removesuffix(".__init__"), path


def imports(path: Path) -> set:
    """Every awq_edge module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("awq_edge")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("awq_edge"):
            # `from awq_edge.engine import plan` imports the submodule plan
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_module_imports_only_what_the_dependency_rule_allows():
    wrong = []
    for module, path in module_files():
        if module == "awq_edge.cli":
            continue  # the command line registers every stage's cli module by name
        stage = next((s for s in ALLOWED if within(module, [s])), None)
        allowed = BASE + ((stage,) + ALLOWED[stage] if stage else ())
        for target in imports(path):
            if not within(target, allowed) and (module, target.rpartition(".")[0]) not in EXCEPTIONS \
                    and (module, target) not in EXCEPTIONS:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the dependency rule:\n" + "\n".join(wrong)


def test_the_base_modules_import_no_stage():
    for module, path in module_files():
        if within(module, BASE[1:]):
            assert all(within(t, BASE) for t in imports(path)), module


def test_every_package_under_awq_edge_is_listed_in_pyproject_so_the_wheel_holds_it():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "awq_edge").rglob("__init__.py")}
    on_disk |= {name for name, folder in setuptools["package-dir"].items() if (ROOT / folder / "__init__.py").is_file()}
    assert on_disk <= listed, f"not listed in pyproject.toml: {sorted(on_disk - listed)}"
    assert listed <= on_disk, f"listed but missing: {sorted(listed - on_disk)}"


def test_no_subpackage_shadows_a_public_function():
    import awq_edge

    for name in awq_edge.__all__:
        assert not (ROOT / "awq_edge" / name).exists() and not (ROOT / "awq_edge" / f"{name}.py").exists(), name


def test_the_top_level_of_awq_edge_keeps_only_shared_modules():
    top = sorted(p.stem for p in (ROOT / "awq_edge").glob("*.py"))
    assert top == ["__init__", "cli", "errors", "outputs", "packing", "quant"]


def test_the_kernel_library_default_path_is_the_cmake_build(monkeypatch):
    from awq_edge.runtime import kernels

    monkeypatch.delenv(kernels.LIB_ENV, raising=False)
    assert kernels.library_path() == ROOT / "plugins" / "build" / "libawq_edge_kernels.so"
    if not (ROOT / "plugins" / "build" / "libawq_edge_kernels.so").is_file():
        pytest.skip("plugins not built (make plugins); the path is still checked above")
