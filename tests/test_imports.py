"""Layers depend one way (docs/ARCHITECTURE.md): every import of every module under trainer/ (module level and
inside functions alike, read with ast) is checked against the table below."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RULES = [
    # (the layer: a package or module, the modules it must not import, the exceptions, why)
    ("trainer.parallel",
     ("deepspeed", "trainer.config", "trainer.model", "trainer.data", "trainer.checkpoint", "trainer.engine"),
     ("deepspeed.accelerator",),
     "collectives and the topology sit below everything; DeepSpeed's topology and mpu are built from them in "
     "trainer/engine/"),
    ("trainer.model", ("trainer.data", "trainer.checkpoint", "trainer.engine"), (),
     "the model is math on the parallel layers; it knows no files, batches or loop"),
    ("trainer.data", ("trainer.model", "trainer.parallel", "trainer.checkpoint", "trainer.engine"), (),
     "data emits integers (token ids, positions, segment boundaries) and knows nothing above them"),
    ("trainer.checkpoint", ("trainer.engine",), (),
     "checkpoint knows files and weights, the engine the loop: loading into a live engine is trainer/engine/resume.py"),
    ("trainer.engine", ("trainer.tools", "trainer.bench", "trainer.train"), (),
     "the engine is the loop around DeepSpeed; the tools (and glm-train) drive it, and hand it what it calls back"),
    *[(layer, ("trainer.tools", "trainer.bench", "trainer.train"), (), "the tools sit on top of the layers")
      for layer in ("trainer.parallel", "trainer.model", "trainer.data", "trainer.checkpoint")],
    ("trainer.tools", ("trainer.bench", "trainer.train"), (), "glm-bench and glm-train are commands above the tools"),
    ("trainer", ("launch",), (), "launch starts the trainer, never the other way round"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-level ones included. `from P import x` counts as
    P.x (x may be a module of package P; a name inside P then still starts with P)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def upward_imports(path: Path, rules=RULES) -> list[str]:
    """The imports of `path` that a rule forbids, as 'file:line: module imports name (why)'."""
    source = module_name(path)
    offences = []
    for layer, forbidden, allowed, why in rules:
        if not _within(source, layer):
            continue
        for line, name in imported_modules(path):
            if any(_within(name, f) for f in forbidden) and not any(_within(name, a) for a in allowed) \
                    and not _within(name, source):
                offences.append(f"{path.relative_to(REPO)}:{line}: {source} imports {name} ({layer}: {why})")
    return offences


def _layer_files(layer: str) -> list[Path]:
    base = REPO / Path(*layer.split("."))
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


@pytest.mark.parametrize("layer, forbidden, allowed, why", RULES, ids=[rule[0] for rule in RULES])
def test_no_upward_import(layer, forbidden, allowed, why):
    rule = [(layer, forbidden, allowed, why)]
    offences = [offence for path in _layer_files(layer) for offence in upward_imports(path, rule)]
    assert not offences, "imports against the one-way rule:\n" + "\n".join(offences)


def test_the_reader_finds_imports_at_every_level(tmp_path, monkeypatch):
    # Guards the test above against a reader that finds nothing: module level, inside a function, relative.
    package = tmp_path / "trainer" / "checkpoint"
    package.mkdir(parents=True)
    (package / "probe.py").write_text("import deepspeed\n\ndef f():\n    from trainer.engine import loop\n"
                                      "    from ..engine.resume import load_any_layout\n    import launch.cli\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    names = [name for _, name in imported_modules(package / "probe.py")]
    assert names == ["deepspeed", "trainer.engine.loop", "trainer.engine.resume.load_any_layout", "launch.cli"]
    offences = upward_imports(package / "probe.py")
    assert len(offences) == 3 and all("trainer.checkpoint.probe imports" in o for o in offences), offences
