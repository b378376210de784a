"""The two layers: a core that needs only torch, and applications that use its public API."""

from __future__ import annotations

import ast
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import snca_ext

PACKAGE = Path(snca_ext.__file__).parent
# Command-line entry points kept at the paths users call (python -m snca_ext.train, ...): they
# forward to snca_ext.apps and are not imported by the core.
ENTRY_POINTS = {"__main__.py", "train.py", "export.py", "neighbors.py", "fewshot.py"}
# The command modules of the applications: each parses and calls; what two of them share lives in
# a module named for it (apps/trained.py, apps/feature_files.py, ...), never in a command.
COMMANDS = {
    "snca_ext.apps.export",
    "snca_ext.apps.neighbors",
    "snca_ext.apps.fewshot",
    "snca_ext.apps.train.cli",
}
TESTS = Path(__file__).parent
# Tests that reach below the public API on purpose: the compiled kernels' static configuration
# (_C), the CUDA arch table (_cuda_arch) and the autograd functions the emulation drives
# (_autograd). Any other private import from a test fails test_tests_use_no_private_name.
PRIVATE_ALLOWED = {
    "test_cuda_static.py": {"snca_ext._C"},
    "test_cuda_arch.py": {"snca_ext._cuda_arch"},
    "test_cuda_emulation.py": {"snca_ext._autograd"},
}


def _core_modules() -> list[Path]:
    files = [path for path in PACKAGE.rglob("*.py") if path.relative_to(PACKAGE).parts[0] != "apps"]
    return [path for path in files if path.name not in ENTRY_POINTS or path.parent != PACKAGE]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _private(module: str, names: list[str]) -> list[str]:
    """The private names (``_x``, not dunders) an import of ``names`` from ``module`` reaches."""

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    return [n for n in names if private(n)] + [p for p in module.split(".") if private(p)]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, relative imports resolved."""
    package = (
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
        if path.is_relative_to(PACKAGE)
        else ""
    )
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_import_snca_ext_loads_nothing_beyond_torch():
    code = (
        "import sys, torch; before = set(sys.modules); import snca_ext; "
        "print(sorted(set(sys.modules) - before))"
    )
    added = eval(subprocess.check_output([sys.executable, "-c", code], text=True))
    assert added and all(module.startswith("snca_ext") for module in added), added
    for heavy in ("torchvision", "sklearn", "matplotlib", "PIL", "snca_ext.apps"):
        assert heavy not in added, f"import snca_ext loaded {heavy}"


def test_the_core_imports_only_torch_and_itself():
    allowed_roots = {"torch", "triton", "snca_ext", "__future__"}
    for path in _core_modules():
        for module, _ in _imports(path):
            root = module.split(".")[0]
            assert root in allowed_roots or root in sys.stdlib_module_names, f"{path.name} imports {module}"
            assert not module.startswith("snca_ext.apps"), f"core module {path.name} imports {module}"


def test_the_applications_use_only_the_public_api_of_the_core():
    for path in (PACKAGE / "apps").rglob("*.py"):
        for module, names in _imports(path):
            if not module.startswith("snca_ext") or module.startswith("snca_ext.apps"):
                continue
            private = _private(module, names)
            assert not private, f"{path.relative_to(PACKAGE)} uses private {module}: {private}"


def test_a_command_module_imports_no_other_command_module():
    """Data flows down: a command (or any application module) imports libraries, never a command
    (``from .export import run`` counts: a command's names are its own)."""
    assert all((PACKAGE.parent / (name.replace(".", "/") + ".py")).is_file() for name in COMMANDS)
    for path in (PACKAGE / "apps").rglob("*.py"):
        for module, names in _imports(path):
            reached = {module} | {f"{module}.{name}" for name in names}
            commands = sorted(reached & COMMANDS - {_module_name(path)})
            assert not commands, f"{path.relative_to(PACKAGE)} imports the command {commands}"


def test_tests_use_no_private_name_of_the_package():
    """A test checks what users and the applications can call; the few that check the kernels'
    internals are named in PRIVATE_ALLOWED with what they reach."""
    for path in TESTS.rglob("*.py"):
        allowed = PRIVATE_ALLOWED.get(path.name, set())
        for module, names in _imports(path):
            if not module.startswith("snca_ext"):
                continue
            reached = {module} | {f"{module}.{name}" for name in names}
            private = [] if reached & allowed else _private(module, names)
            assert not private, f"{path.relative_to(TESTS)} imports private {module}: {private}"


@pytest.mark.parametrize("command", ["train", "export", "neighbors", "fewshot"])
def test_the_old_command_paths_forward_to_the_applications(command, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{PACKAGE}/{command}.py", "--help"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module(f"snca_ext.{command}", run_name="__main__")
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m snca_ext.{command}")


def test_console_scripts_point_at_the_commands():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.value.startswith("snca_ext")}
    assert set(scripts) == {"snca-train", "snca-export", "snca-neighbors", "snca-fewshot"}
    for script in scripts.values():
        assert callable(script.load())


def test_python_m_snca_ext_names_its_commands_and_runs_one(monkeypatch, capsys):
    """A bare ``python -m snca_ext`` once started a 25-epoch run and ``python -m snca_ext export``
    failed as an unknown train argument: now it lists the commands and dispatches to them."""
    from snca_ext.__main__ import COMMANDS, main

    assert main([]) == 2
    listed = capsys.readouterr().err
    assert all(command in listed for command in ("train", "export", "neighbors", "fewshot")), listed
    assert main(["serve"]) == 2 and "unknown command 'serve'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "python -m snca_ext COMMAND" in capsys.readouterr().out
    for command in COMMANDS:
        with pytest.raises(SystemExit) as stopped:
            main([command, "--help"])
        assert stopped.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m snca_ext.{command}")
    assert main(["fewshot", "/nonexistent.safetensors"]) == 2
