"""The architecture of docs/architecture.md, checked: which part may import which."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "rpsconvert"

# part -> the parts it may import (besides itself); docs/architecture.md draws the same picture
ALLOWED = {
    "version": set(),
    "errors": set(),
    "engine": {"errors"},
    "format": {"engine", "errors", "version"},
    "quality": {"engine", "format", "errors"},  # a teacher read from its files (quality/sharding.py)
    "conversion": {"engine", "format", "quality", "errors"},
    "streaming": {"engine", "format", "quality", "conversion", "errors"},  # convert() of a model read from its files; what calibrating it would hold
    "cli": {"engine", "format", "quality", "conversion", "streaming", "errors", "version", "__init__"},
    "__init__": {"engine", "format", "quality", "conversion", "streaming", "errors", "version"},
    "__main__": {"cli"},  # python -m rpsconvert
}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name == "rpsconvert":
                parts.add("__init__")
            elif name.startswith("rpsconvert."):
                parts.add(name.split(".")[1])
    return parts


def test_every_part_imports_only_the_parts_below_it():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        part = _part(path)
        assert part in ALLOWED, f"{path} is in no part of the architecture"
        wrong = _imported_parts(path) - ALLOWED[part] - {part}
        assert not wrong, f"{path.relative_to(PACKAGE)} ({part}) imports {sorted(wrong)}"


def test_the_package_does_not_need_the_dev_extras():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "sklearn" not in text and "import examples" not in text, path


def test_no_file_the_tests_read_from_tests_data_is_ignored_by_git():
    """A golden file that .gitignore hides passes here and is missing from every clean clone (CI
    failed so on the sharded golden's shards, `*.rps.safetensors`)."""
    import shutil
    import subprocess

    root = PACKAGE.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        return  # an installed copy, not a checkout: nothing to commit
    files = [str(p.relative_to(root)) for p in (root / "tests" / "data").rglob("*") if p.is_file()]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True).stdout.split()
    assert ignored == []
