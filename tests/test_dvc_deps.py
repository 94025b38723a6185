"""Every DVC stage declares the project code it imports and the params it reads.

A stage whose deps miss a module it imports lets `dvc repro` reuse numbers computed by old code:
the one thing a reproducibility tool must not do. The import closure of each stage's entry module
is derived from the source (every `import` anywhere in a module, lazy ones included), so a new
import without a new dep fails here. A second test edits a file in a temporary copy and asks DVC
itself whether it sees the stage as changed.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("metarec", "audit", "pipelines")


def _module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None when it is not project code."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[str]:
    """Dotted names a module imports (absolute and relative, at any depth in the module)."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0]
        here = pkg
    else:
        here = pkg.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)   # `from audit import gate`
    return out


def _registered_models() -> list[str]:
    """The modules the model registry imports by name (`registry.BUILTIN`, "module:Class"): a stage
    that reaches the registry can run any of them, and the import statements do not show it."""
    from metarec.models.registry import BUILTIN

    return sorted({target.split(":")[0] for target in BUILTIN.values()})


def import_closure(module: str) -> set[Path]:
    """Project files reached from `module` by imports, with the packages' __init__ files; reaching
    the model registry reaches every model it names."""
    seen: set[Path] = set()
    todo = [module]
    registry = _module_file("metarec.models.registry")
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):   # importing a.b.c runs a/__init__ and a/b/__init__
            f = _module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(_imports(f))
                if f == registry:
                    todo.extend(_registered_models())
    return seen


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _entry(cmd: str) -> str:
    m = re.search(r"python -m ([\w.]+)", cmd)
    assert m, f"stage command {cmd!r} does not run a project module with `python -m`"
    return m.group(1)


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = sorted(_stages())


@pytest.mark.parametrize("name", STAGES)
def test_stage_deps_cover_its_import_closure(name: str) -> None:
    st = _stages()[name]
    deps = [str(d) for d in st.get("deps", [])]
    closure = import_closure(_entry(st["cmd"]))
    missing = sorted(p.relative_to(ROOT).as_posix() for p in closure if not _covered(p, deps))
    assert not missing, f"stage {name} imports project files not in its deps: {missing}"


def test_closure_reaches_the_models_the_registry_loads_by_name() -> None:
    """Known answer: the train stage imports no model module directly, yet runs MeLU's code."""
    files = {p.relative_to(ROOT).as_posix() for p in import_closure("pipelines.train")}
    assert {"metarec/models/melu.py", "metarec/models/transfer.py", "metarec/models/classic.py",
            "metarec/models/ensemble.py", "metarec/models/training.py", "metarec/models/gram.py"} <= files


def test_closure_finds_lazy_and_from_imports() -> None:
    """Known answer: the evaluate stage reaches audit.accuracy and pipelines.common."""
    files = {p.relative_to(ROOT).as_posix() for p in import_closure("pipelines.evaluate")}
    assert {"pipelines/evaluate.py", "pipelines/common.py", "pipelines/__init__.py",
            "audit/accuracy.py", "audit/__init__.py", "metarec/__init__.py"} <= files


def _top_level_params_read(module_file: Path) -> set[str]:
    """Top-level params.yaml keys a stage module reads as params["key"] or params.get("key")."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == "params" and isinstance(node.slice, ast.Constant)):
            keys.add(str(node.slice.value))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "params" and node.args
                and isinstance(node.args[0], ast.Constant)):
            keys.add(str(node.args[0].value))
    return keys


@pytest.mark.parametrize("name", STAGES)
def test_stage_params_cover_the_keys_its_module_reads(name: str) -> None:
    st = _stages()[name]
    declared: set[str] = set()
    for p in st.get("params", []):
        if isinstance(p, dict):   # `- params.yaml:` (every key) or `- params.yaml: [keys]`
            keys = next(iter(p.values()))
            declared |= set(keys) if keys else set(yaml.safe_load((ROOT / "params.yaml").read_text()))
        else:
            declared.add(str(p).split(".")[0])
    declared |= {"models", "seeds"} if name.startswith("train") else set()   # the matrix itself
    read: set[str] = set()
    for f in import_closure(_entry(st["cmd"])):   # the stage module and the audit code it hands params to
        if f.relative_to(ROOT).parts[0] != "metarec":
            read |= _top_level_params_read(f)
    read &= set(yaml.safe_load((ROOT / "params.yaml").read_text()))   # keys, not record fields
    assert not read - declared, f"stage {name} reads params {sorted(read - declared)} it does not declare"


def _dvc() -> Path:
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists():
        pytest.skip("dvc is not installed next to this python")
    return dvc


def _copy_project(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("needs a git checkout")
    for rel in filter(None, files.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _placeholder_workspace(root: Path) -> None:
    """Stand-in files for every dep and out, so `dvc commit` can record a lock without running."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, st in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        cells = [{}]
        if "matrix" in st:
            cells = [{"model": m, "seed": s} for m in params["models"] for s in params["seeds"]]
        for cell in cells:
            paths = [str(d) for d in st.get("deps", [])]
            for group in ("outs", "metrics", "plots"):
                paths += [next(iter(o)) if isinstance(o, dict) else str(o) for o in st.get(group, [])]
            for p in paths:
                p = p.replace("${item.model}", str(cell.get("model"))).replace("${item.seed}", str(cell.get("seed")))
                target = root / p
                if target.exists():
                    continue
                if target.suffix:   # a file
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text("{}" if target.suffix == ".json" else "placeholder\n")
                else:               # a folder
                    target.mkdir(parents=True, exist_ok=True)
                    (target / "placeholder").write_text("placeholder\n")


def _changed_stages(dvc: Path, root: Path) -> set[str]:
    r = subprocess.run([str(dvc), "status", "--json"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json
    return set(json.loads(r.stdout or "{}"))


@pytest.mark.slow
def test_editing_a_file_in_a_closure_marks_its_stage_changed(tmp_path: Path) -> None:
    """DVC itself sees the edit: audit/accuracy.py for evaluate (the issue's case), and one file
    of each other stage's closure that no earlier stage shares, so the check is not vacuous."""
    dvc = _dvc()
    root = tmp_path / "proj"
    root.mkdir()
    _copy_project(root)
    trimmed = yaml.safe_load((root / "params.yaml").read_text())
    trimmed["models"], trimmed["seeds"] = trimmed["models"][:1], trimmed["seeds"][:1]
    (root / "params.yaml").write_text(yaml.safe_dump(trimmed, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _placeholder_workspace(root)
    r = subprocess.run([str(dvc), "commit", "-f", "-q"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _changed_stages(dvc, root) == set()

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    probes = {"evaluate": "audit/accuracy.py"}
    for name, st in stages.items():
        if name in probes or "matrix" in st:
            continue
        own = sorted(p.relative_to(ROOT).as_posix() for p in import_closure(_entry(st["cmd"])))
        probes[name] = next(f for f in own if f.startswith("audit/") or f == own[0])
    for name, rel in probes.items():
        f = root / rel
        original = f.read_text()
        f.write_text(original + "\n# edited\n")
        try:
            assert name in _changed_stages(dvc, root), f"editing {rel} did not mark {name} changed"
        finally:
            f.write_text(original)


def suggested_deps(module: str) -> list[str]:
    """The import closure of a stage module as dvc.yaml deps: a folder where its whole subtree is
    reached (a folder dep covers every file below it), else the files."""
    files = {p.relative_to(ROOT).as_posix() for p in import_closure(module)}
    folders = sorted({f.rsplit("/", 1)[0] for f in files}, key=lambda d: d.count("/"))
    out: list[str] = []
    for folder in folders:
        if folder == "pipelines" or any(folder.startswith(d + "/") for d in out):
            continue
        tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")}
        if tree <= files:
            out.append(folder)
    out += [f for f in files if not any(f.startswith(d + "/") for d in out)]
    return sorted(out)


if __name__ == "__main__":   # print each stage's closure as deps, to paste into dvc.yaml
    for stage_name, st in _stages().items():
        print(f"{stage_name}: [{', '.join(suggested_deps(_entry(st['cmd'])))}]")
