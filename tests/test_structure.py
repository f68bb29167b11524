"""The package's shape, as the README's layout section describes it: floors that import only
downwards (so no import circle), short functions and modules, function-local imports only where
they keep a heavy or optional package off a light path (each saying why), and layout names
compared only where sources are opened."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "birdgen"
PAGES = PACKAGE.parent / "pages"
# Lowest first: a module imports its own floor and those below, never one above.
FLOORS = {
    "base": {"utils", "images", "precision", "public"},
    "data": {"sources", "data", "datacheck", "download"},
    "model": {"networks", "diffusion", "samplers", "guidance", "records", "metrics_file", "model_folder", "species",
              "features"},
    "runs": {"run_folder", "run_config", "loop", "train", "distillation", "modelcard", "export"},
    "use": {"pipeline", "editing", "visualize", "memorization", "evaluation"},
    "front": {"cli", "ui", "training_jobs", "__main__", "__init__"},
}
LEVEL = {module: level for level, modules in enumerate(FLOORS.values()) for module in modules}
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 500
ARGPARSE_DECLARATIONS = re.compile(r"^(build_parser|add_\w+_(parser|parsers|flags))$")  # cli.py's, exempt
LAZY_IMPORTS = {"torch_fidelity", "huggingface_hub", "torch.utils.tensorboard", "wandb", ".evaluation"}
LAYOUT_NAMES = ('"cub"', '"class-folders"', '"flat"')


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def package_imports(tree: ast.Module) -> set[str]:
    return {node.module.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def test_every_module_has_a_floor_and_imports_only_its_own_or_lower_ones():
    trees = modules()
    assert set(trees) == set(LEVEL), f"place these in FLOORS: {sorted(set(trees) ^ set(LEVEL))}"
    upward = [f"{name} -> {dep}" for name, tree in trees.items() for dep in package_imports(tree)
              if LEVEL[dep] > LEVEL[name]]
    assert not upward


def test_no_import_circle():
    graph = {name: package_imports(tree) for name, tree in modules().items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in graph[name]:
            visit(dep)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_functions_and_modules_stay_short():
    long = []
    for path in sorted(PACKAGE.glob("*.py")) + sorted(PAGES.glob("*.py")):
        text = path.read_text()
        if path.name != "cli.py" and len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not ARGPARSE_DECLARATIONS.match(node.name):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines")
    assert not long


def test_function_local_imports_only_keep_heavy_packages_off_light_paths_and_say_so():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                name = ("." * node.level + (node.module or "")) if isinstance(node, ast.ImportFrom) \
                    else node.names[0].name
                explained = any("#" in line for line in lines[max(0, node.lineno - 3):node.lineno])
                if not (any(name == lazy or name.startswith(lazy + ".") for lazy in LAZY_IMPORTS) and explained):
                    found.append(f"{path.name}:{node.lineno} {name}")
    assert not found


def test_layout_names_are_compared_only_in_sources():
    found = [f"{path.name}:{number}" for path in sorted(PACKAGE.glob("*.py")) + sorted(PAGES.glob("*.py"))
             if path.name != "sources.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if any(name in line for name in LAYOUT_NAMES)]
    assert not found
