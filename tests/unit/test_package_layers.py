"""The package's folders are floors: a module imports only from its own floor or the ones below, so the
method's levels (token → behaviour → preference) read bottom-up and no import cycle can form between them."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "align3gr_pipelines"
# Lowest first. Kedro's entry modules (settings, pipeline_registry, cli, __main__) and pipelines/ sit on top.
FLOORS = ["devices", "torchrun", "data", "datasets", "tracking", "tokenizer", "cf", "lm", "evaluation", "sft", "preference",
          "serving"]
TOP = "pipelines"


def floor_of(module: str) -> int:
    head = module.split(".")[0]
    return FLOORS.index(head) if head in FLOORS else len(FLOORS)


def imported_modules(source: str, here: tuple[str, ...]) -> set[str]:
    """Project modules that `source` (the module at dotted path `here`) imports, lazy imports inside
    functions included."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                name = ".".join([*here[: len(here) - node.level], *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == "align3gr_pipelines":
                name = node.module[len("align3gr_pipelines"):].lstrip(".")
            else:
                continue
            found |= {a.name for a in node.names} if not name else {name}
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("align3gr_pipelines.")}
    return found


def upward_imports(path: Path, module: str) -> list[str]:
    targets = imported_modules(path.read_text(), tuple(module.split(".")))
    return [f"{module} -> {t}" for t in sorted(targets) if floor_of(t) > floor_of(module)]


def test_every_folder_named_here_exists_and_every_core_module_sits_on_a_floor():
    for floor in FLOORS:
        assert (PACKAGE / floor).is_dir() or (PACKAGE / f"{floor}.py").is_file(), floor
    top_level = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top_level == {"devices", "torchrun", "settings", "pipeline_registry", "cli", "__main__"}


def test_no_module_imports_from_a_floor_above_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if floor_of(module) < len(FLOORS):
            upward += upward_imports(path, module)
    assert not upward, upward


def test_the_checker_flags_upward_imports_lazy_and_relative_ones_too(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text(
        "from align3gr_pipelines.devices import pick_device\n"
        "def f():\n    from align3gr_pipelines.sft import tasks\n"
        "from ..preference import softmax_dpo\n"
        "import align3gr_pipelines.serving.recommend\n"
    )
    assert upward_imports(fake, "lm.fake") == ["lm.fake -> preference", "lm.fake -> serving.recommend", "lm.fake -> sft"]
    assert imported_modules("from align3gr_pipelines import sft, devices", ("x",)) == {"sft", "devices"}
