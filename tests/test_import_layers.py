"""The repository's imports, read with `ast`: every arrow points down the layers, and no import circle exists,
not even one that function-local imports hold open."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"ddmim": ROOT / "ddmim", "ddmim_kernels": ROOT / "kernels", "data_prep": ROOT / "data_prep",
           "benchmarks": ROOT / "benchmarks"}

# lower imports nothing higher; equal ranks of different parts do not import each other. The scripts (the
# converters, the benchmarks) sit above the whole library: ddmim never imports them.
LAYERS = {
    "ddmim.errors": 0, "ddmim.atomic": 0, "ddmim.config_engine": 0.5, "ddmim.machine": 1, "ddmim.config": 1,
    "ddmim.finetune_config": 2,
    "ddmim.checkpoints": 3, "ddmim.probes": 3, "ddmim_kernels": 3, "ddmim.models": 4, "ddmim.data": 4, "ddmim.train": 6,
    "ddmim.eval": 7, "ddmim.demo": 8, "ddmim.cli_failures": 8.5, "ddmim.cli": 9, "ddmim.__main__": 10,
    "ddmim.presets": 0, "ddmim": 0,
    "data_prep": 11, "benchmarks": 12,
}


def module_name(package: str, path: Path) -> str:
    parts = path.relative_to(SOURCES[package]).with_suffix("").parts
    name = ".".join((package, *parts))
    return name.removesuffix(".__init__")


def part_of(module: str) -> str:
    """The layer a module belongs to: its sub-package of ddmim, or its own name."""
    if module.startswith("ddmim."):
        head = ".".join(module.split(".")[:2])
        return head if head in LAYERS else "ddmim"
    return module.split(".")[0]


def _is_module(name: str) -> bool:
    package, *rest = name.split(".")
    base = SOURCES.get(package)
    return base is not None and bool(rest) and (base.joinpath(*rest).with_suffix(".py").is_file()
                                                 or base.joinpath(*rest, "__init__.py").is_file())


def imports() -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its body (function-local ones included)."""
    graph: dict[str, set[str]] = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            name = module_name(package, path)
            found = graph.setdefault(name, set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from package import submodule` imports the submodule; anything else, the module named
                    targets = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                               for a in node.names]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    continue
                found.update(t for t in targets if t.split(".")[0] in SOURCES)
    return {name: {t for t in targets if t in graph} for name, targets in graph.items()}


def test_every_arrow_points_down_the_layers():
    upward = []
    for module, targets in imports().items():
        for target in targets:
            a, b = part_of(module), part_of(target)
            if a != b and (LAYERS[b] > LAYERS[a] or LAYERS[b] == LAYERS[a]):
                upward.append(f"{module} -> {target}")
            own_package = module.rsplit(".", 1)[0]
            if a == b and target == own_package:  # a submodule climbing back to its package's __init__
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_circle():
    graph = imports()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_only_the_factory_of_the_model_code_reads_the_run_config():
    readers = sorted(m for m, targets in imports().items() if m.startswith("ddmim.models.")
                     and any(t.startswith(("ddmim.config", "ddmim.finetune_config")) for t in targets))
    assert readers == ["ddmim.models.factory"]


@pytest.mark.parametrize("planted, message", [
    ("from ddmim.train.launch import Launch\n", "ddmim.data.pixels -> ddmim.train.launch"),
    ("from ddmim.data import FORMATS\n", "ddmim.data.pixels -> ddmim.data"),
    ("from data_prep.conversion import Workers\n", "ddmim.data.pixels -> data_prep.conversion"),
])
def test_the_layer_check_catches_a_planted_upward_import(planted, message, monkeypatch):
    path = SOURCES["ddmim"] / "data" / "pixels.py"
    original = Path.read_text

    def with_plant(self, *args, **kwargs):
        text = original(self, *args, **kwargs)
        return planted + text if self == path else text

    monkeypatch.setattr(Path, "read_text", with_plant)
    with pytest.raises(AssertionError, match=message):
        test_every_arrow_points_down_the_layers()


def test_the_circle_check_catches_a_planted_local_import(monkeypatch):
    path = SOURCES["ddmim"] / "models" / "swin.py"
    original = Path.read_text

    def with_plant(self, *args, **kwargs):
        text = original(self, *args, **kwargs)
        return text + "\n\ndef late():\n    from ddmim.models.factory import BACKBONES\n" if self == path else text

    monkeypatch.setattr(Path, "read_text", with_plant)
    with pytest.raises(AssertionError, match="ddmim.models.swin"):
        test_no_import_circle()
