"""Every benchmark script still starts: `python benchmarks/X.py --help` exits 0 (a benchmark that
breaks, e.g. by an import it shadows, is found here rather than on the day it is needed), and no
script is named like a standard-library module (benchmarks/tokenize.py once shadowed `tokenize`,
so datatrove's import of dill failed in every other benchmark)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_no_benchmark_shadows_a_standard_library_module() -> None:
    shadowing = [p.name for p in SCRIPTS if p.stem in sys.stdlib_module_names]
    assert not shadowing, f"benchmarks named like standard-library modules: {shadowing}"


def test_every_benchmark_script_starts() -> None:
    assert len(SCRIPTS) >= 5

    def help_of(path: Path) -> tuple[str, subprocess.CompletedProcess]:
        proc = subprocess.run(
            [sys.executable, str(path.relative_to(ROOT)), "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return path.name, proc

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(help_of, SCRIPTS))
    broken = {name: proc.stderr[-1500:] for name, proc in results if proc.returncode != 0 or "usage" not in proc.stdout}
    assert not broken, broken


IMPORT_CHECK = """
import ast, importlib, importlib.util, pathlib, sys
sys.path.insert(0, "benchmarks")  # as when a script runs: its folder first on the path
names = set()
for path in sorted(pathlib.Path("benchmarks").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
local = {p.stem for p in pathlib.Path("benchmarks").glob("*.py")}
for name in sorted(names - local):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:  # an engine this machine does not have (vllm on a GPU box)
        missing = (exc.name or "").split(".")[0]
        if missing and importlib.util.find_spec(missing) is None:
            continue
        raise SystemExit(f"{name}: {exc!r}")
    except Exception as exc:
        raise SystemExit(f"{name}: {exc!r}")
"""


def test_every_module_a_benchmark_imports_loads_from_the_benchmarks_folder() -> None:
    """The imports the scripts make only once they run (datatrove's blocks, forge's modules), made
    the way a script makes them: with benchmarks/ first on sys.path."""
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
