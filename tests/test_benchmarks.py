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


def test_gpu_throughput_ratios_pair_each_phase_with_its_reference(capsys) -> None:
    """The GPU benchmark's ratios and tables, from figures as its phases write them (the phases
    themselves need the device): a rollout variant is compared with the waves of its own kind."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_throughput as g
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    load = {"engine_requests_mean": 700.0, "engine_below_full_batch_s": 3.0, "loop_busy": 0.4}
    phases = {
        "offline": {"output_tok_s": 30_000.0, "main_thread_busy": 0.5},
        "async": {"output_tok_s": 29_400.0, "main_thread_busy": 0.6},
        "forge": {"output_tok_s": 30_300.0, "first_request_after_ready_s": 0.2, **load},
        "offline3": {"output_tok_s": 20_000.0},
        "rollout3": {"output_tok_s": 21_000.0, **load},
        "offline3chain": {"output_tok_s": 16_000.0, "prefix_cache_hit_rate": 0.02},
        "rollout3chain": {"output_tok_s": 20_000.0, "prefix_cache_hit_rate": 0.6, **load},
        "rollout3chain_fifo": {"output_tok_s": 17_600.0, "prefix_cache_hit_rate": 0.3, **load},
        "offline#2": {"output_tok_s": 25_000.0},
        "forge#2": {"output_tok_s": 25_500.0, **load},
    }
    g.add_ratios(phases)
    assert round(phases["forge"]["vs_offline"], 3) == 1.01 and round(phases["forge#2"]["vs_offline"], 3) == 1.02
    assert round(phases["async"]["vs_offline"], 3) == 0.98 and "vs_forge" not in phases["async"]
    assert phases["rollout3"]["vs_offline3"] == 1.05
    assert phases["rollout3chain"]["vs_offline3"] == 1.25 and phases["rollout3chain_fifo"]["vs_offline3"] == 1.1
    g.print_tables({"phases": phases, "elapsed_s": 1.0})
    out = capsys.readouterr().out
    assert "rollout3chain_fifo" in out and "where the time went" in out
    busy = next(line for line in out.splitlines() if line.startswith("forge ") and "0.400" in line)
    assert "700.0" in busy and "0.20" in busy
