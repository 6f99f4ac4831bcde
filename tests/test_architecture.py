"""Data flows one way: no module imports from a later pipeline stage than its own (imports inside
functions included), in the order of :data:`STAGES`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vertstudy"

#: the stages, first to last, and the modules (dotted prefixes under ``vertstudy``) of each
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("shared basics", ("anatomy", "errors", "config", "progress", "checkpoint", "atomic", "memory")),
    ("data", ("data",)),
    ("model", ("model",)),
    ("losses", ("losses",)),
    ("train", ("train",)),
    ("infer", ("infer",)),
    ("study", ("study", "localcluster", "localnet")),
    ("report", ("report",)),
    ("bench", ("bench",)),
    ("cli", ("cli",)),
]


def stage_of(module: str) -> int:
    """Index in :data:`STAGES` of ``vertstudy.<module>``; the package itself counts as shared."""
    name = module.removeprefix("vertstudy").lstrip(".")
    if not name:
        return 0
    for i, (_, prefixes) in enumerate(STAGES):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"vertstudy.{name}: in no stage of STAGES; add it to one")


def imports(path: Path) -> set[str]:
    """Every ``vertstudy...`` module ``path`` imports, anywhere in it."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vertstudy")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")[
                    : len(module.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("vertstudy"):
                # `from vertstudy.study import storage` imports the submodule: count the deepest one
                found |= {f"{target}.{a.name}" if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).is_dir()
                          or (PACKAGE.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).is_file()
                          else target for a in node.names}
    return found


def test_no_module_imports_from_a_later_stage():
    backwards = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        own = stage_of(module)
        for target in sorted(imports(path)):
            if stage_of(target) > own:
                backwards.append(f"{module} ({STAGES[own][0]}) imports {target} ({STAGES[stage_of(target)][0]})")
    print("stages, first to last:", " < ".join(name for name, _ in STAGES))
    assert not backwards, "imports against the flow:\n" + "\n".join(backwards)


def test_every_module_is_in_a_stage():
    for path in PACKAGE.rglob("*.py"):
        stage_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"))
