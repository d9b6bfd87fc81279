"""What forge would submit, without a Slurm: sbatch scripts (golden files), per-role resources,
cluster config checks, sweep point run dirs and the multi-node Ray launch script.

Set FORGE_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from forge.cli import conf_dir, sweep_point_dir, swept_keys, to_schema
from forge.cluster.ray import ray_launch_script
from forge.cluster.slurm import render_sbatch, sbatch_params
from forge.config import register_configs
from forge.schema import ConfigError

register_configs()
GOLDEN = Path(__file__).parent / "golden"


def _cfg(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir()):
        return to_schema(compose(config_name="config", overrides=list(overrides)))


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FORGE_UPDATE_GOLDEN"):
        path.write_text(text)
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "generated"))
        pytest.fail(f"{name} changed (FORGE_UPDATE_GOLDEN=1 to accept):\n{diff}")


H100_RUN = ("model=qwen3_4b", "cluster=slurm_h100", "cluster.tasks=20", "cluster.workers=10", "output.dir=/runs/q4b")


@pytest.mark.parametrize("role", ["shards", "monitor", "finalize"])
def test_slurm_h100_sbatch_matches_golden_file(role: str) -> None:
    cfg = _cfg(*H100_RUN)
    text = render_sbatch(cfg, role, Path("/runs/q4b/slurm/%j"), python="python3")
    _check_golden(f"slurm_h100_{role}.sbatch", text)


def test_gpus_cpus_and_memory_follow_the_model_parallelism() -> None:
    params = sbatch_params(_cfg(*H100_RUN, "model.tp=4", "model.dp=2"), "shards", "run")
    assert params["gpus_per_node"] == 8 and params["cpus_per_task"] == 88 and params["mem"] == "1760GB"
    assert params["array_parallelism"] == 10 and params["nodes"] == 1
    assert params["additional_parameters"]["requeue"] is True
    multi = sbatch_params(
        _cfg(*H100_RUN, "model=kimi_k2_instruct_tp8_pp2", "cluster.nodes_per_task=2"), "shards", "run"
    )
    assert multi["nodes"] == 2 and multi["gpus_per_node"] == 8 and multi["ntasks_per_node"] == 1


def test_cpu_tasks_ask_for_no_gpu_and_side_jobs_are_small() -> None:
    cfg = _cfg("cluster=slurm_ci", "cluster.tasks=3", "cluster.workers=2", "cluster.mem_gb=4")
    shards = sbatch_params(cfg, "shards", "run")
    assert "gpus_per_node" not in shards and shards["cpus_per_task"] == 1 and shards["mem"] == "4GB"
    finalize = sbatch_params(cfg, "finalize", "run")
    assert finalize["cpus_per_task"] == 1 and finalize["additional_parameters"]["kill-on-invalid-dep"] == "yes"
    assert "array_parallelism" not in sbatch_params(cfg, "monitor", "run")


def test_extra_sbatch_lines_and_setup_reach_the_script() -> None:
    cfg = _cfg(*H100_RUN, "+cluster.sbatch_extra.reservation=big", "cluster.setup=[module load cuda]")
    text = render_sbatch(cfg, "shards", Path("/r/%j"), python="python3")
    assert "#SBATCH --reservation=big" in text and "\nmodule load cuda\n" in text


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("model=qwen3_235b_a22b_thinking_2507_tp8", "cluster=slurm_h100", "model.tp=16"), "cluster.nodes_per_task"),
        (("cluster=slurm_ci", "cluster.workers=0"), "cluster.workers"),
        (("cluster=slurm_ci", "cluster.task_index=0"), "cluster.task_index"),
        (("cluster.nodes_per_task=2",), "cluster.nodes_per_task"),
        (("model=qwen3_4b", "cluster=slurm_h100", "cluster.nodes_per_task=2"), "cluster.nodes_per_task"),
    ],
)
def test_cluster_mistakes_name_the_key(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        _cfg(*overrides)


def test_too_many_gpus_for_a_node_says_how_many_nodes() -> None:
    with pytest.raises(ConfigError, match="set cluster.nodes_per_task=2"):
        _cfg("model=qwen3_235b_a22b_thinking_2507_tp8", "cluster=slurm_h100", "model.tp=16")


def test_sweep_points_are_named_by_the_swept_keys_only() -> None:
    argv = ["model=qwen3_4b", "model.max_num_seqs=256,512", "cluster=slurm_h100", "dataset.name=/d/x.jsonl"]
    keys = swept_keys(argv, {"run.max_in_flight": "8,32"})
    assert keys == {"model.max_num_seqs", "run.max_in_flight"}
    point = ["model=qwen3_4b", "model.max_num_seqs=512", "cluster=slurm_h100", "run.max_in_flight=8"]
    assert sweep_point_dir("outputs/x", point, keys) == "outputs/x/model.max_num_seqs=512,run.max_in_flight=8"
    assert sweep_point_dir("o", ["dataset.name=/data/a b.jsonl"], {"dataset.name"}) == "o/dataset.name=_data_a_b.jsonl"
    long = sweep_point_dir("o", ["dataset.name=" + "x" * 400], {"dataset.name"})
    assert len(Path(long).name) < 255 and long != sweep_point_dir("o", ["dataset.name=" + "x" * 401], {"dataset.name"})


def test_ray_launch_script_matches_golden_file() -> None:
    _check_golden("ray_launch_2x8.sh", ray_launch_script(nodes=2, gpus_per_node=8))
