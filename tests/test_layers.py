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


def _core_modules() -> list[Path]:
    files = [*PACKAGE.glob("*.py"), *(PACKAGE / "triton").glob("*.py")]
    return [path for path in files if path.name not in ENTRY_POINTS or path.parent != PACKAGE]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
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
            private = [n for n in names if n.startswith("_")] + [
                p for p in module.split(".") if p.startswith("_")
            ]
            assert not private, f"{path.relative_to(PACKAGE)} uses private {module}: {private}"


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
