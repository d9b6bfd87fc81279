"""Recipes (forge/recipe/): the bundled tiny_sft recipe run for real with the tiny CPU model,
re-runs that do nothing, a downstream change that leaves upstream outputs untouched, a setting
switched back that reuses the earlier output, recipe.only, and config mistakes inside one step."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import read_rows
from conftest import run_recipe as run

STEPS = ["generate", "curate", "dedup", "score", "tokenize"]
pytestmark = pytest.mark.xdist_group("tiny_recipe")  # one worker builds the shared recipe
THRESHOLD = "recipe.steps.dedup.set.dedup.minhash.threshold"


def digest(root: Path) -> dict[str, str]:
    """Every file under root (links followed as names only), with its content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_the_tiny_recipe_runs_every_stage_and_records_its_lineage(tiny_recipe: Path, tmp_path: Path) -> None:
    state = json.loads((tiny_recipe / "state.json").read_text())
    assert sorted(state["current"]) == sorted(STEPS) and state["order"] == STEPS
    for step in STEPS:
        link = tiny_recipe / step
        assert link.is_symlink() and link.resolve() == (tiny_recipe / "steps" / step / state["current"][step]).resolve()
        assert (link / "state" / "finished.json").exists(), step
    assert len(read_rows(tiny_recipe / "generate")) == 48
    assert len(read_rows(tiny_recipe / "score")) == len(read_rows(tiny_recipe / "dedup"))
    index = json.loads((tiny_recipe / "tokenize" / "index.json").read_text())
    assert index["format"] == "megatron" and index["seq_len"] == 64
    lineage = json.loads((tiny_recipe / "lineage.json").read_text())
    assert [s["step"] for s in lineage["steps"]] == STEPS
    for s in lineage["steps"]:
        assert s["fingerprint"] == state["current"][s["step"]] and s["counts"]["in"] > 0 and s["seconds"] is not None
    assert lineage["steps"][2]["settings"]["set"]["dedup"]["minhash"]["threshold"] == 0.7
    card = (tiny_recipe / "tokenize" / "README.md").read_text()
    chain = card[card.index("## Lineage") :].split("\n\n")[2]
    assert [line.split("|")[1].strip() for line in chain.splitlines()[2:]] == STEPS
    assert "| tokenize | tokenize |" in card and "| 48 | 48 |" in chain
    status = __import__("subprocess").run(
        ["forge-status", str(tiny_recipe)], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    for step in STEPS:
        assert any(line.split()[:1] == [step] and "finished" in line for line in status.stdout.splitlines()), (
            status.stdout
        )
    assert "5/5 step(s) finished and up to date" in status.stdout


def test_a_rerun_does_nothing(tiny_recipe: Path, tmp_path: Path) -> None:
    before, times = digest(tiny_recipe), mtimes(tiny_recipe)
    proc = run(tmp_path, tiny_recipe)
    assert proc.returncode == 0, proc.stderr
    for step in STEPS:
        assert f"step {step} ({step}): up to date" in proc.stdout
    assert "will run" not in proc.stdout and "engine ready" not in proc.stderr
    assert digest(tiny_recipe) == before and mtimes(tiny_recipe) == times  # not one file written


def test_a_downstream_change_reruns_only_downstream_and_switching_back_reuses(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    root = tmp_path / "tiny_sft"
    shutil.copytree(tiny_recipe, root, symlinks=True)
    state = json.loads((root / "state.json").read_text())["current"]
    upstream = {s: digest(root / "steps" / s) for s in ("generate", "curate")}
    upstream_times = {s: mtimes(root / "steps" / s) for s in ("generate", "curate")}

    plan = run(tmp_path, root, f"{THRESHOLD}=0.5", "recipe.plan=true")
    assert plan.returncode == 0, plan.stderr
    lines = {line.split()[0]: line for line in plan.stdout.splitlines()[1:]}
    assert "up to date" in lines["generate"] and "up to date" in lines["curate"]
    assert "will run: settings changed: dedup.minhash.threshold 0.7 -> 0.5" in lines["dedup"]
    assert "will run: input dedup runs" in lines["score"] and "will run: input score runs" in lines["tokenize"]
    assert not (root / "steps" / "dedup").joinpath(lines["dedup"].split()[2]).exists()  # plan runs nothing

    changed = run(tmp_path, root, f"{THRESHOLD}=0.5")
    assert changed.returncode == 0, changed.stderr
    now = json.loads((root / "state.json").read_text())["current"]
    assert {s: now[s] == state[s] for s in STEPS} == {
        "generate": True,
        "curate": True,
        "dedup": False,
        "score": False,
        "tokenize": False,
    }
    for s in ("generate", "curate"):
        assert digest(root / "steps" / s) == upstream[s] and mtimes(root / "steps" / s) == upstream_times[s]

    old = {s: digest(root / "steps" / s / state[s]) for s in ("dedup", "score", "tokenize")}
    back = run(tmp_path, root)  # the threshold back at 0.7: the earlier outputs, nothing recomputed
    assert back.returncode == 0, back.stderr
    for s in ("dedup", "score", "tokenize"):
        assert f"step {s} ({s}): reuse ({state[s]})" in back.stdout
        assert digest(root / "steps" / s / state[s]) == old[s]
        assert (root / s).resolve() == (root / "steps" / s / state[s]).resolve()
    assert json.loads((root / "state.json").read_text())["current"] == state
    again = run(tmp_path, root, f"{THRESHOLD}=0.5", "recipe.plan=true")  # and forth: also kept
    assert all("will run" not in line for line in again.stdout.splitlines()), again.stdout


def test_recipe_only_runs_one_step_and_refuses_stale_inputs(tiny_recipe: Path, tmp_path: Path) -> None:
    refused = run(tmp_path, tiny_recipe, "recipe.only=score", f"{THRESHOLD}=0.6")
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("forge: error: recipe.only=score: its input step dedup is not up to date"), line
    assert not any(
        p.name != json.loads((tiny_recipe / "state.json").read_text())["current"]["dedup"]
        for p in (tiny_recipe / "steps" / "dedup").iterdir()
        if p.is_dir()
    )
    ok = run(tmp_path, tiny_recipe, "recipe.only=curate")
    assert ok.returncode == 0 and "step curate (curate): up to date" in ok.stdout
    assert "step generate" not in ok.stdout and "step dedup" not in ok.stdout
    unknown = run(tmp_path, tiny_recipe, "recipe.only=train")
    assert unknown.returncode == 2 and "recipe.only: no step 'train'; steps: generate, curate" in unknown.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (f"{THRESHOLD.replace('threshold', 'threshhold')}=0.5", "recipe.steps.dedup.set.dedup.minhash.threshhold: "),
        (f"+{THRESHOLD.replace('threshold', 'threshhold')}=0.5", "recipe.steps.dedup: dedup.minhash.threshhold: "),
        (f"{THRESHOLD}=2", "recipe.steps.dedup: dedup.minhash.threshold"),
        ("recipe.steps.score.groups.model=no_such_model", "recipe.steps.score.groups: model=no_such_model"),
        ("recipe.steps.curate.stage=cook", "recipe.steps.curate.stage: no stage 'cook'"),
        ("recipe.steps.dedup.input=[curat]", "recipe.steps.dedup.input[0]: 'curat' is neither an earlier step"),
        ("recipe.steps.tokenize.set.tokenize.format=parquet", "recipe.steps.tokenize: tokenize.format"),
    ],
)
def test_a_mistake_inside_one_step_names_the_step_and_key(tmp_path: Path, override: str, expected: str) -> None:
    root = tmp_path / "r"
    proc = run(tmp_path, root, override, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"forge: error: {expected}"), proc.stderr
    assert not root.exists()  # refused before anything was written


def test_settings_that_do_not_change_results_do_not_change_fingerprints(forge_cache: Path) -> None:
    from forge.compose import compose, to_schema
    from forge.recipe.steps import build_steps

    def fingerprints(*extra: str) -> dict[str, str]:
        cfg = to_schema(compose(["recipe=tiny_sft", "recipe.dir=/nonexistent/tiny_sft", *extra]))
        return {s.name: s.fingerprint for s in build_steps(cfg.recipe, list(extra))}

    base = fingerprints()
    neutral = fingerprints(
        "run.progress=false",
        "run.max_in_flight=3",
        "run.log_every_s=5",
        "cluster.workers=4",
        "+recipe.steps.tokenize.set.tokenize.workers=1",
        "+recipe.steps.score.set.score.batch_tokens=1024",
        "model.startup_timeout_s=10",
    )
    assert neutral == base
    longer = fingerprints("recipe.steps.generate.set.generation.max_tokens=40")
    assert all(longer[s] != base[s] for s in STEPS)  # generate changed: everything after it too
    later = fingerprints("+recipe.steps.score.set.score.mask=all")
    assert [s for s in STEPS if later[s] != base[s]] == ["score", "tokenize"]
    # a plain override on the command line wins over the recipe file, and only where it is read
    longer_seqs = fingerprints("tokenize.seq_len=128")
    assert [s for s in STEPS if longer_seqs[s] != base[s]] == ["tokenize"]


def test_publishing_a_recipe_publishes_the_final_data_with_the_whole_chain(tiny_recipe: Path, tmp_path: Path) -> None:
    """recipe.hub_repo on a finished recipe: nothing re-runs, the final step's data and its card
    (with every step of the chain) land in the repo of FakeHub, the Hub's TEST DOUBLE (tests/fake_hub.py)."""
    import os
    import subprocess
    import sys

    from fake_hub import FakeHub

    root = tmp_path / "tiny_sft"
    shutil.copytree(tiny_recipe, root, symlinks=True)
    token = "hf_" + "ab" * 17
    with FakeHub({token: "write"}, user="forge-tester") as hub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
        env["HF_TOKEN"] = token
        args = ["run.progress=false", "recipe=tiny_sft", f"recipe.dir={root}", "recipe.hub_repo=forge-tester/tiny"]
        proc = subprocess.run(
            [sys.executable, "-m", "forge.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count(": up to date (") == len(STEPS) and "published tokenize" in proc.stdout
        files = hub.files("forge-tester/tiny")
        card = files["README.md"].decode()
        chain = card[card.index("## Lineage") :]
        assert all(f"| {s} | {s} |" in chain for s in STEPS)
        assert "stats.json" in files and "index.json" in files
        local = {
            str(p.relative_to(root / "tokenize")) for p in (root / "tokenize" / "tokens").rglob("*") if p.is_file()
        }
        assert local and local <= set(files) and any(name.endswith(".bin") for name in local)
        assert token not in card


def test_a_weighted_mix_of_steps_and_datasets_composes_into_sources(forge_cache: Path) -> None:
    from forge.compose import compose, to_schema
    from forge.recipe.steps import build_steps

    mix = "recipe.steps.dedup.input=[{name:curate,weight:3},{name:generate,weight:1,max_rows:10}]"
    cfg = to_schema(compose(["recipe=tiny_sft", "recipe.dir=/nonexistent/tiny_sft", mix]))
    steps = {s.name: s for s in build_steps(cfg.recipe, [mix])}
    sources = steps["dedup"].cfg.dataset.sources
    assert [(s.label, s.weight, s.max_rows) for s in sources] == [("curate", 3.0, None), ("generate", 1.0, 10)]
    assert [s.name for s in sources] == [str(steps["curate"].dir), str(steps["generate"].dir)]
    assert steps["dedup"].inputs == ["curate", "generate"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "recipe").glob("*.yaml")))
def test_every_bundled_recipe_composes_and_plans_offline(name: str, tmp_path: Path, forge_cache: Path) -> None:
    proc = run_plan(tmp_path, name)
    assert proc.returncode == 0, proc.stderr
    assert "will run: never run" in proc.stdout and not (tmp_path / "r").exists()


def run_plan(tmp: Path, name: str):
    from conftest import forge_cli

    return forge_cli([f"recipe={name}", f"recipe.dir={tmp / 'r'}", "recipe.plan=true"], tmp, timeout=120)


def test_a_changed_input_file_changes_the_fingerprint_and_an_unchanged_one_is_read_once(
    forge_cache: Path, tmp_path: Path
) -> None:
    from forge.compose import compose, to_schema
    from forge.recipe.steps import build_steps

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(5)))

    def first() -> str:
        extra = [f"recipe.steps.generate.input=[{data}]"]
        cfg = to_schema(compose(["recipe=tiny_sft", "recipe.dir=/nonexistent/tiny_sft", *extra]))
        return build_steps(cfg.recipe, extra)[0].fingerprint

    before = first()
    digests = forge_cache / "file_digests.json"
    assert str(data) in digests.read_text()
    stamp = digests.stat().st_mtime_ns
    assert first() == before and digests.stat().st_mtime_ns == stamp  # known file: nothing hashed or written
    data.write_text(data.read_text().replace("question 4", "question 5"))  # same size, new content
    assert first() != before


def test_a_secret_in_a_step_setting_is_never_written_or_printed(tiny_recipe: Path, tmp_path: Path) -> None:
    root = tmp_path / "tiny_sft"
    shutil.copytree(tiny_recipe, root, symlinks=True)
    secret = "sk-" + "Zq7" * 8
    proc = run(tmp_path, root, f"+recipe.steps.curate.set.model.engine_args.api_key={secret}", "recipe.only=curate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step curate (curate): will run: settings changed" in proc.stdout
    assert secret not in proc.stdout + proc.stderr
    leaked = [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked
