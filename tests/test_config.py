from pathlib import Path

import pytest
from conftest import REPO, forge_cli
from hydra import compose, initialize_config_dir

from forge.cli import conf_dir, one_line, to_schema
from forge.config import register_configs
from forge.engine.config import EngineKind
from forge.schema import ConfigError

register_configs()
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir()):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name: str) -> None:
    cfg = to_schema(_compose(f"experiment={name}"))
    assert cfg.output.examples_per_chunk > 0


@pytest.mark.parametrize("name", MODELS)
def test_every_model_composes(name: str) -> None:
    extra = ["model.name_or_path=some/model"] if name == "endpoint" else []
    cfg = to_schema(_compose(f"model={name}", *extra))
    assert cfg.model.engine in EngineKind


def test_default_is_offline_tiny_model() -> None:
    cfg = to_schema(_compose())
    assert cfg.model.name_or_path == "forge://tiny-qwen3"
    assert cfg.model.engine == EngineKind.transformers
    assert cfg.dataset.name == "forge://sample" and cfg.dataset.id_column is None
    assert cfg.output.dir == "outputs/tiny-qwen3__sample"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.tpp=2", "model.tpp: Key 'tpp' not in 'ModelConfig' (did you mean model.tp?)"),
        ("model.tp=abc", "model.tp: Value 'abc' of type 'str' could not be converted to Integer"),
        ("prompt.on_overlong=chop", "prompt.on_overlong: Invalid value 'chop'"),
    ],
)
def test_composition_errors_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(Exception) as info:
        _compose(override)
    assert one_line(info.value).startswith(expected)


def test_unknown_group_option_lists_choices() -> None:
    with pytest.raises(Exception) as info:
        _compose("model=nope")
    line = one_line(info.value)
    assert line.startswith("model=nope: no such model config; choose one of:")
    assert "tiny_cpu" in line and "\n" not in line


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.tp=0"], "model.tp"),
        (["model.gpu_memory_utilization=1.5"], "model.gpu_memory_utilization"),
        (["model.engine=endpoint"], "model.endpoint_url"),
        (["generation.top_k=5"], "generation.top_k"),  # the CPU engine answers 422 to top_k
        (["generation.max_tokens=4096"], "generation.max_tokens"),  # >= max_model_len 2048
        (["output.examples_per_chunk=0"], "output.examples_per_chunk"),
        (["cluster.tasks=2", "cluster.task_index=2"], "cluster.task_index"),
        (["model.api_key_env=sk-live-123"], "model.api_key_env"),
    ],
)
def test_bad_values_raise_config_error_naming_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_schema(_compose(*overrides))
    assert str(info.value).startswith(key + ":")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path: Path) -> None:
    proc = forge_cli(["model.tpp=2"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["forge: error: model.tpp: Key 'tpp' not in 'ModelConfig' (did you mean model.tp?)"]
    assert not (tmp_path / "outputs").exists()


def test_cli_cfg_job_prints_composed_config(tmp_path: Path) -> None:
    proc = forge_cli(["--cfg", "job"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "name_or_path: forge://tiny-qwen3" in proc.stdout


DATASETS = sorted(p.stem for p in (REPO / "conf" / "dataset").glob("*.yaml"))
PIPELINES = sorted(p.stem for p in (REPO / "conf" / "pipeline").glob("*.yaml"))


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_composes_with_every_pipeline(name: str, pipeline: str) -> None:
    cfg = to_schema(_compose(f"dataset={name}", f"pipeline={pipeline}"))
    assert cfg.pipeline.stage == pipeline


def test_the_smollm3_stage1_mix_validates_as_published() -> None:
    """It cannot run here (Hub datasets), but it composes, validates and builds its stage."""
    from forge.io.mix import check_mix
    from forge.stages.curate.normalize import check_spec

    cfg = to_schema(_compose("pipeline=curate", "dataset=mix_smollm3_stage1"))
    d = cfg.dataset
    assert len(d.sources) == 41 and abs(sum(s.weight for s in d.sources) - 1.0) < 1e-6
    check_mix(d)
    for i, s in enumerate(d.sources):
        check_spec(s, f"dataset.sources[{i}]")
    assert {s.label for s in d.sources} >= {"fineweb-edu", "dclm"}


def test_default_pipeline_is_generation_and_its_run_dir_is_unchanged() -> None:
    cfg = to_schema(_compose())
    assert cfg.pipeline.stage == "generate" and cfg.output.dir == "outputs/tiny-qwen3__sample"
    assert to_schema(_compose("pipeline=curate", "dataset=mix_tiny")).output.dir == "outputs/curate__mix_tiny"


def test_a_recipe_experiment_chains_its_stages() -> None:
    gen = to_schema(_compose("experiment=tiny_generate_then_curate"))
    cur = to_schema(_compose("experiment=tiny_generate_then_curate", "pipeline=curate"))
    assert gen.dataset.name == "forge://sample" and cur.dataset.name == gen.output.dir
    assert cur.curate.pools == {"long_answers": "num_turns >= 2"}


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "rollout").glob("*.yaml")))
def test_every_rollout_composes_and_its_function_loads(name: str) -> None:
    from forge.stages.generate.rollout.checks import rollout_fn

    cfg = to_schema(_compose(f"rollout={name}"))
    fn = rollout_fn(cfg.rollout)
    assert set(getattr(fn, "prompts", ())) <= set(cfg.rollout.prompts)


def test_judge_model_is_any_model_file() -> None:
    cfg = to_schema(_compose("rollout=judge", "judge_model=endpoint", "judge_model.endpoint_url=http://127.0.0.1:9"))
    assert cfg.judge_model.engine.value == "endpoint" and cfg.model.engine.value == "transformers"
    assert to_schema(_compose()).judge_model is None
    with pytest.raises(Exception, match="judge_model.endpoint_url: required"):
        to_schema(_compose("judge_model=endpoint", "judge_model.endpoint_url=null"))
