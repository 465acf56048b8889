"""The READMEs name only files that exist, the front door stays short, and every module says what it holds
(the READMEs keep no file map, so the module docstrings are the map)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_FOLDERS = ("ddmim", "kernels", "data_prep", "benchmarks", "tests", ".ci")
# a repository path in running text or a command: a top-level folder, then a path
ROOTED = re.compile(r"(?<![\w./~-])((?:%s)/[\w.*/-]*[\w*/])" % "|".join(re.escape(f) for f in TOP_FOLDERS))
# a bare file name in backticks, read beside the README that names it
BARE = re.compile(r"`([\w-]+\.(?:py|sh|md))`")


def readmes() -> list[Path]:
    return sorted(p for p in ROOT.rglob("README.md") if not {".venv", ".git", "build"} & set(p.parts))


def placeholder(name: str) -> bool:
    """A name that stands for any file, such as benchmarks/NAME.py."""
    stem = name.rsplit("/", 1)[-1].split(".")[0]
    return stem.isupper() and stem != "README"


def missing_names(readme: Path, text: str) -> list[str]:
    """The names in `text` that are neither a file nor a folder (globs: no match) of the repository."""
    missing = []
    for name in ROOTED.findall(text):
        if placeholder(name):
            continue
        if not (any(ROOT.glob(name)) if "*" in name else (ROOT / name).exists()):
            missing.append(name)
    for name in BARE.findall(text):
        if placeholder(name):
            continue
        if not ((readme.parent / name).exists() or (ROOT / name).exists()):
            missing.append(name)
    return missing


def test_every_file_a_readme_names_exists():
    found = {str(p.relative_to(ROOT)): missing_names(p, p.read_text()) for p in readmes()}
    assert len(found) >= 6, found
    assert {k: v for k, v in found.items() if v} == {}


def test_a_missing_name_is_found():
    text = "see `ddmim/train/run.py`, `ddmim/train/no_such.py`, `benchmarks/results/*-nothing.json` and `gone.py`"
    assert missing_names(ROOT / "ddmim" / "train" / "README.md", text) == [
        "ddmim/train/no_such.py", "benchmarks/results/*-nothing.json", "gone.py"]
    assert missing_names(ROOT / "ddmim" / "train" / "README.md", "`run.py`, `benchmarks/README.md`, `NAME.py`") == []


def test_the_front_door_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_module_has_a_docstring():
    undocumented = []
    for folder in ("ddmim", "kernels", "data_prep", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text()
            if source.strip() and not ast.get_docstring(ast.parse(source)):
                undocumented.append(str(path.relative_to(ROOT)))
    assert undocumented == []

