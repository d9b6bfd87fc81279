"""Dataclass schemas for every conf group, registered in Hydra's ConfigStore.

conf/config.yaml lists `forge_schema` first in its defaults, so every group file and override
is merged onto a typed node: a typo such as `model.tpp=2` fails at composition, key named. Cross-field rules
that a type cannot express live in `validate()` and raise ConfigError naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from forge.engine.config import EngineKind, ModelConfig
from forge.recipe.config import RecipeConfig
from forge.schema import ConfigError, neutral
from forge.stages.registry import DEFAULT_STAGE, STAGES, hook, spec, stage_groups
from forge.storage.config import StorageConfig


class OnChange(str, Enum):
    error = "error"  # stop and explain what changed
    fresh = "fresh"  # move the old output aside and start again


@dataclass
class SourceSpec:
    """One source of a weighted mix (dataset.sources), or the single dataset itself.

    Attributes:
        name: Hub dataset id, local file, glob or directory (a forge run dir reads its data/).
        label: short name in stats, the card and each row's `source.dataset`; null = name.
        weight: share of the mix before temperature (p_i ∝ weight^(1/temperature)); > 0.
        max_rows: read at most this many rows of this source; null = all.
        format: auto | messages | sharegpt | prompt_response | harmony | text (how rows become chats).
        columns: field map, `{role: column}`: messages, conversations, prompt, response, text,
            system, reasoning, id (the source's own id, kept in `source.id`).
        meta: `meta_*` maps, `{correctness: {column: c, map: {...}}, difficulty_bin: {column: d,
            bins: [...]}, domain: {column: s} or {value: math}}` (forge/stages/curate/normalize.py).
    """

    name: str = "???"
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    label: str | None = None
    weight: float = 1.0
    max_rows: int | None = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """Where documents come from.

    Attributes:
        name: Hub dataset id, or a parquet/jsonl/json/csv/arrow file, glob or directory, local
            or remote (`s3://`, `gs://`, `hf://`, `https://`, any fsspec protocol: conf `storage:`),
            or a `save_to_disk` directory. `forge://sample` is the bundled sample.
        streaming: read a Hub dataset file by file as the stage goes, instead of downloading it
            first (remote files are always read that way); a resume skips exactly the rows done.
        config: Hub config (subset) name.
        split: split to read.
        revision: Hub revision (branch, tag or commit) to pin.
        prompt_column: column holding a string or a list of {role, content} messages.
        id_column: column with a unique id per row; default: the row's position.
        max_examples: read at most this many rows (before sharding); null = all.
        keep_columns: input columns copied into each output row's `metadata` (JSON).
        format, columns, meta: curate only: the shape of this dataset's rows (see SourceSpec).
        text_column: batch stages: the column holding plain text (sets format=text and
            columns.text); a row without it stops the run naming the column.
        sources: curate only: a weighted mix; when set, name/format/columns/meta above are unused.
        target_rows, target_tokens: size the mix to this many rows (or about this many tokens,
            counted as characters / 4); null = every row of every source once (weights unused).
        temperature: p_i ∝ weight_i^(1/temperature); 1 keeps the weights, larger flattens them.
        seed: which rows the mix samples; the same seed gives the same rows.
        pilot_rows: a sized mix runs each source's first rows through the stage to learn the share
            it keeps, and reads more of a source its filters thin out, so the KEPT rows meet the
            target and the requested shares; 0 = size on input rows.
        max_repeat: a sized mix reads a source the stage thins out at most this many times over
            (or as often as its share alone asks, if more), so a source that keeps few rows
            cannot flood the run with copies; short of its share, a warning and the achieved
            share in stats.json and the card say so.
        allow_unfinished: read a forge run dir (or a mix source that is one) that is not finished
            (killed, failed, or being written right now): only its whole chunks are read, and
            the log, stats.json (`unfinished_inputs`) and the card say so. Default: refused.
    """

    name: str = "forge://sample"
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    streaming: bool = False
    prompt_column: str = "prompt"
    id_column: str | None = None
    max_examples: int | None = None
    keep_columns: list[str] = field(default_factory=list)
    # curate (forge pipeline=curate): the single dataset's shape, or a weighted mix of sources
    format: str = "auto"
    text_column: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    sources: list[SourceSpec] = field(default_factory=list)
    target_rows: int | None = None
    target_tokens: int | None = None
    temperature: float = 1.0
    seed: int = 0
    pilot_rows: int = 1000
    max_repeat: float = 10.0
    allow_unfinished: bool = neutral(False)


@dataclass
class OutputConfig:
    """Where results go.

    Attributes:
        dir: the run directory: Parquet shards, request cache, stats.json, logs, config.
        examples_per_chunk: rows per Parquet shard file.
        on_change: what a re-run does when input, sharding or generation settings changed.
        hub_repo: also publish to this Hub dataset repo (`user/name`) as chunks finish
            (forge/io/hub.py); the token comes from HF_TOKEN or the saved login. null = local only.
        private: create the Hub repo private (an existing repo keeps its visibility).
        hub_commits_per_hour: most commits a run makes to hub_repo in any hour; each commit
            batches every chunk finished since the last one. The Hub allows about 128 per repo
            (more than that is warned about, and its 429s are waited out).
        hub_max_retries, hub_backoff_s: retries of a Hub call on 429 / 412 / 5xx / connection
            errors, the first after hub_backoff_s, doubling (Retry-After wins when sent).
    """

    dir: str = neutral("outputs/default")
    examples_per_chunk: int = 500
    on_change: OnChange = neutral(OnChange.error)
    hub_repo: str | None = neutral(None)
    private: bool = neutral(True)
    hub_commits_per_hour: int = neutral(60)
    hub_max_retries: int = neutral(8)
    hub_backoff_s: float = neutral(2.0)


@dataclass
class RunConfig:
    """How requests are driven.

    Attributes:
        max_in_flight: concurrent requests per task; null = chosen from the engine's KV-cache
            capacity and the expected sequence length (vLLM), else 64.
        request_timeout_s: per-request timeout.
        max_retries: retries on 429/5xx/timeouts/connection errors before quarantine.
        backoff_s: first retry delay; doubles each attempt (with jitter), capped at 60 s.
        retry_failed: on a re-run, retry rows quarantined for transient failures.
        progress: show the live progress bar.
        log_every_s: interval of plain progress lines in the log.
        adaptive_concurrency: AIMD on the in-flight limit (forge/engine/adaptive.py): start at
            16, grow while answers are healthy, cut to 70% on 429/503/504/timeouts, pause for
            Retry-After and rate-limit headers; max_in_flight is the ceiling. null = on for
            `model.engine=endpoint` (a hosted API's limits are unknown), off for engines forge
            starts itself (sized from their KV cache).
        budget_usd: stop sending before the run dir's spend (over all its sessions) could pass
            this many US dollars: each request reserves its worst case (prompt + max_tokens at
            model.price_*) while in flight (forge/engine/pricing.py). With cluster.tasks > 1 each
            task gets an equal share. null: no cap. Needs model prices.
        plan: estimate rows, requests, tokens, cost and time, print them (and plan.json), and
            run nothing else: only `plan_pilot` pilot requests are sent, their answers kept in
            the request cache for the real run (forge/stages/generate/estimate.py).
        plan_pilot: how many requests the estimate's pilot sends.
    """

    max_in_flight: int | None = neutral(None)
    request_timeout_s: float = neutral(600.0)
    max_retries: int = neutral(5)
    backoff_s: float = neutral(1.0)
    retry_failed: bool = neutral(True)
    progress: bool = neutral(True)
    log_every_s: float = neutral(30.0)
    adaptive_concurrency: bool | None = neutral(None)
    budget_usd: float | None = neutral(None)
    plan: bool = neutral(False)
    plan_pilot: int = neutral(16)


class Backend(str, Enum):
    local = "local"  # every shard in this process, one after another
    slurm = "slurm"  # a Slurm job array through submitit, plus monitor and finalize jobs


@dataclass
class ClusterConfig:
    """Where tasks run (forge/cluster/).

    Attributes:
        name: a label for this cluster config (shown in logs and job names).
        backend: `local` or `slurm`.
        tasks: number of disjoint input shards (row i goes to shard i % tasks); on Slurm, the
            size of the job array.
        task_index: run only this shard; null = all shards.
        workers: Slurm: most array tasks running at once (`--array=...%workers`); null = all.
        nodes_per_task: nodes per task, > 1 for models spanning nodes (vLLM over Ray).
        gpus_per_node: GPUs a node has; GPUs per task (tp * pp * dp) must fit in
            nodes_per_task nodes.
        partition, qos, account, constraint, exclude: the sbatch options of the same name.
        time_min: time limit per task in minutes; a task requeues itself before it hits it.
        cpus_per_gpu, mem_per_gpu_gb: resources per GPU for GPU engines.
        cpus_per_task, mem_gb: resources of a task with no GPU (CPU engine, endpoint).
        sbatch_extra: extra `#SBATCH --key=value` lines, `{key: value}`.
        setup: shell lines run before each job (module load, source venv, exports).
        signal_delay_s: USR2 arrives this long before the time limit: checkpoint and requeue.
        max_requeues: requeues after time limits before a task is failed.
        monitor_interval_s: how often the monitor job refreshes progress.json.
        wait: block until the jobs end and report their outcome (benchmarks use it).
        dry_run: write the sbatch scripts into the run dir and submit nothing.
    """

    name: str = neutral("local")
    backend: Backend = neutral(Backend.local)
    tasks: int = 1
    task_index: int | None = neutral(None)
    workers: int | None = neutral(None)
    nodes_per_task: int = neutral(1)
    gpus_per_node: int | None = neutral(None)
    partition: str | None = neutral(None)
    qos: str | None = neutral(None)
    account: str | None = neutral(None)
    constraint: str | None = neutral(None)
    exclude: str | None = neutral(None)
    time_min: int = neutral(1440)
    cpus_per_gpu: int | None = neutral(None)
    mem_per_gpu_gb: int | None = neutral(None)
    cpus_per_task: int = neutral(2)
    mem_gb: int | None = neutral(None)
    sbatch_extra: dict[str, Any] = neutral(factory=dict)
    setup: list[str] = neutral(factory=list)
    signal_delay_s: int = neutral(120)
    max_requeues: int = neutral(3)
    monitor_interval_s: float = neutral(30.0)
    wait: bool = neutral(False)
    dry_run: bool = neutral(False)


@dataclass
class SweepConfig:
    """How a multirun (`forge +sweep=NAME` or `--multirun`) treats points of an earlier run of
    the same sweep (forge/sweep/points.py). Points that finished are always skipped: re-running one
    would add an empty session to its stats and its throughput figures would be lost.

    Attributes:
        retry_failed: also re-run points that failed for a known reason (OOM, start-up
            timeout, engine failure); off by default, because the same settings fail the same
            way. Points that failed for another reason are always re-run.
    """

    retry_failed: bool = False


@dataclass
class PipelineConfig:
    """Which stage this run is (conf/pipeline/): each is one package of forge/stages/ that
    transforms rows, listed in forge/stages/registry.py; reading, sharding, output, resume, stats,
    card, cluster and Hub are the run lifecycle's (forge/run/). Any forge run dir is a valid
    dataset.name for the next stage.

    Attributes:
        stage: a name in forge/stages/registry.py: generate | curate | dedup | tokenize | score.
    """

    stage: str = DEFAULT_STAGE


def _root_fields() -> list[tuple[str, Any, Any]]:
    """The root schema's fields: the shared groups, then every stage's own groups (from the registry)."""
    shared: list[tuple[str, Any, Any]] = [
        ("pipeline", PipelineConfig, field(default_factory=PipelineConfig)),
        ("dataset", DatasetConfig, field(default_factory=DatasetConfig)),
        ("model", ModelConfig, field(default_factory=ModelConfig)),
        # a second model a rollout may call (`generate(..., model="judge")`); null = the main one
        ("judge_model", Optional[ModelConfig], field(default=None)),  # noqa: UP045 (OmegaConf reads typing.Optional)
        ("output", OutputConfig, field(default_factory=OutputConfig)),
        ("run", RunConfig, field(default_factory=RunConfig)),
        ("cluster", ClusterConfig, field(default_factory=ClusterConfig)),
        ("sweep", SweepConfig, field(default_factory=SweepConfig)),
        ("storage", StorageConfig, field(default_factory=StorageConfig)),
        ("recipe", RecipeConfig, field(default_factory=RecipeConfig)),
    ]
    groups = [(key, schema, field(default_factory=schema)) for key, schema in stage_groups().items()]
    return shared + groups


# The whole config: `cfg.model`, `cfg.dedup`, ... (a stage's groups come from forge/stages/registry.py,
# so a new stage adds no line here)
ForgeConfig = make_dataclass("ForgeConfig", _root_fields())
ForgeConfig.__module__ = __name__


def register_configs() -> None:
    """Register the schema that conf/config.yaml lists first: it types every group below it, and
    the `judge_model` group: every conf/model/ file, so `judge_model=endpoint` picks a second model
    exactly as `model=endpoint` picks the first (one set of model files, never two to keep in step)."""
    store = ConfigStore.instance()
    store.store(name="forge_schema", node=ForgeConfig)
    conf = os.environ.get("FORGE_CONF_DIR") or Path(__file__).resolve().parent.parent / "conf"
    models = Path(conf) / "model"
    for path in sorted(models.glob("*.yaml")):
        store.store(group="judge_model", name=path.stem, node=OmegaConf.load(path))
    if not OmegaConf.has_resolver("slug"):
        OmegaConf.register_new_resolver("slug", slug)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
    if not OmegaConf.has_resolver("by_stage"):
        OmegaConf.register_new_resolver("by_stage", by_stage)


def _positive(key: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{key}: must be > 0 (got {value})")


def validate(cfg: ForgeConfig) -> None:
    """Cross-field checks that types alone cannot express: the shared groups', then the stage's
    (its groups' own validate() methods and its registry `validate` hook)."""
    if cfg.pipeline.stage not in STAGES:
        raise ConfigError(f"pipeline.stage: no stage {cfg.pipeline.stage!r}; stages: {', '.join(STAGES)}")
    m = cfg.model
    validate_model("model", m)
    if cfg.judge_model is not None:
        validate_model("judge_model", cfg.judge_model)
    _positive("output.examples_per_chunk", cfg.output.examples_per_chunk, allow_none=False)
    validate_hub(cfg.output)
    _positive("run.max_in_flight", cfg.run.max_in_flight)
    _positive("run.request_timeout_s", cfg.run.request_timeout_s, allow_none=False)
    if cfg.run.budget_usd is not None:
        if cfg.run.budget_usd <= 0:
            raise ConfigError(f"run.budget_usd: must be > 0 US dollars (got {cfg.run.budget_usd})")
        if cfg.model.price_in_per_mtok is None and cfg.model.price_out_per_mtok is None:
            raise ConfigError(
                "run.budget_usd: needs the model's prices to count spend: set model.price_in_per_mtok and "
                "model.price_out_per_mtok (US dollars per million tokens)"
            )
    if cfg.run.plan_pilot < 1:
        raise ConfigError(f"run.plan_pilot: must be >= 1 (got {cfg.run.plan_pilot})")
    if cfg.run.plan and cfg.pipeline.stage != DEFAULT_STAGE:
        raise ConfigError(f"run.plan: estimates a generation run; not pipeline={cfg.pipeline.stage}")
    if cfg.run.max_retries < 0:
        raise ConfigError(f"run.max_retries: must be >= 0 (got {cfg.run.max_retries})")
    if cfg.dataset.max_examples is not None and cfg.dataset.max_examples < 0:
        raise ConfigError(f"dataset.max_examples: must be >= 0 (got {cfg.dataset.max_examples})")
    if not cfg.dataset.prompt_column:
        raise ConfigError("dataset.prompt_column: must name a column")
    validate_cluster(cfg)
    cfg.storage.validate()
    stage = spec(cfg.pipeline.stage)
    for key in stage.groups:
        own = getattr(getattr(cfg, key), "validate", None)
        if own is not None:
            own()
    check = hook(cfg.pipeline.stage, "validate")
    if check is not None:
        check(cfg)


def validate_model(prefix: str, m: ModelConfig) -> None:
    """The checks of one model (`model` or `judge_model`)."""
    for key in ("tp", "pp", "dp"):
        _positive(f"{prefix}.{key}", getattr(m, key), allow_none=False)
    for key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
        _positive(f"{prefix}.{key}", getattr(m, key))
    if m.gpu_memory_utilization is not None and not 0 < m.gpu_memory_utilization <= 1:
        raise ConfigError(f"{prefix}.gpu_memory_utilization: must be in (0, 1] (got {m.gpu_memory_utilization})")
    if m.speculative is not None and not isinstance(m.speculative, dict):
        raise ConfigError(
            f"{prefix}.speculative: must be a mapping ({{method: ngram, ...}}) or null (got {m.speculative!r})"
        )
    remote = (EngineKind.endpoint, EngineKind.openai_batch, EngineKind.anthropic_batch)
    if m.engine in remote and not m.endpoint_url:
        raise ConfigError(f"{prefix}.endpoint_url: required when {prefix}.engine={m.engine.value}")
    if not 0 <= m.batch_discount < 1:
        raise ConfigError(f"{prefix}.batch_discount: must be in [0, 1) (got {m.batch_discount})")
    if m.batch_size < 1:
        raise ConfigError(f"{prefix}.batch_size: must be >= 1 (got {m.batch_size})")
    if m.engine not in remote and m.endpoint_url:
        raise ConfigError(
            f"{prefix}.endpoint_url: only used with {prefix}.engine=endpoint (engine is {m.engine.value})"
        )
    if m.engine == EngineKind.transformers and m.tp * m.pp * m.dp != 1:
        raise ConfigError(f"{prefix}.tp/pp/dp: the transformers CPU engine runs one process; use 1")
    for key in ("price_in_per_mtok", "price_out_per_mtok", "price_cached_in_per_mtok"):
        value = getattr(m, key)
        if value is not None and value < 0:
            raise ConfigError(f"{prefix}.{key}: a price must be >= 0 US dollars per million tokens (got {value})")
    if m.api_key_env is not None and not m.api_key_env.replace("_", "").isalnum():
        raise ConfigError(
            f"{prefix}.api_key_env: must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not a key"
        )


def validate_hub(o: OutputConfig) -> None:
    if o.hub_repo is not None:
        parts = o.hub_repo.split("/")
        if len(parts) != 2 or not all(parts) or any(c.isspace() for c in o.hub_repo):
            raise ConfigError(f"output.hub_repo: must be `user/name` or `org/name` (got {o.hub_repo!r})")
    _positive("output.hub_commits_per_hour", o.hub_commits_per_hour, allow_none=False)
    if o.hub_max_retries < 0:
        raise ConfigError(f"output.hub_max_retries: must be >= 0 (got {o.hub_max_retries})")
    _positive("output.hub_backoff_s", o.hub_backoff_s, allow_none=False)


def gpus_per_task(cfg: ForgeConfig) -> int:
    """GPUs one task holds: tp * pp * dp for GPU engines, none for the CPU engine or an endpoint;
    a judge_model on a GPU engine shares them with the model (validate() makes their memory shares fit)."""
    models = [cfg.model] + ([cfg.judge_model] if cfg.judge_model is not None else [])
    local = (EngineKind.transformers, EngineKind.endpoint, EngineKind.openai_batch, EngineKind.anthropic_batch)
    return max((m.tp * m.pp * m.dp for m in models if m.engine not in local), default=0)


def validate_cluster(cfg: ForgeConfig) -> None:
    c = cfg.cluster
    _positive("cluster.tasks", c.tasks, allow_none=False)
    if c.task_index is not None and not 0 <= c.task_index < c.tasks:
        raise ConfigError(f"cluster.task_index: must be in [0, {c.tasks}) (got {c.task_index})")
    _positive("cluster.workers", c.workers)
    _positive("cluster.nodes_per_task", c.nodes_per_task, allow_none=False)
    _positive("cluster.time_min", c.time_min, allow_none=False)
    _positive("cluster.cpus_per_task", c.cpus_per_task, allow_none=False)
    gpus = gpus_per_task(cfg)
    if c.nodes_per_task > 1:
        if c.backend != Backend.slurm:
            raise ConfigError("cluster.nodes_per_task: tasks spanning nodes need cluster.backend=slurm")
        if cfg.model.engine != EngineKind.vllm:
            raise ConfigError("cluster.nodes_per_task: only model.engine=vllm spans nodes (vLLM over Ray)")
        if gpus % c.nodes_per_task:
            raise ConfigError(
                f"cluster.nodes_per_task: {c.nodes_per_task} nodes cannot split tp*pp*dp={gpus} GPUs evenly"
            )
    if c.gpus_per_node is not None and gpus and gpus // c.nodes_per_task > c.gpus_per_node:
        need = -(-gpus // c.gpus_per_node)
        raise ConfigError(
            f"cluster.nodes_per_task: tp*pp*dp={gpus} GPUs do not fit in {c.nodes_per_task} node(s) of "
            f"{c.gpus_per_node} GPUs (cluster.gpus_per_node); set cluster.nodes_per_task={need}"
        )
    if c.backend == Backend.slurm and c.task_index is not None:
        raise ConfigError("cluster.task_index: Slurm runs every unfinished shard; use cluster.backend=local")


def by_stage(stage: object, *choices: str) -> str:
    """`${by_stage:${pipeline.stage},'generate=a','curate=b'}`: the value for this stage, so one
    experiment file can describe a multi-stage recipe (each stage reads the one before it)."""
    name = str(getattr(stage, "value", stage))
    table = dict(c.split("=", 1) for c in choices)
    if name not in table:
        raise ConfigError(f"pipeline.stage: this recipe has no {name!r} stage; its stages: {', '.join(table)}")
    return table[name]


def run_name(stage: object, model: object, dataset: object) -> str:
    """The default run dir's name: `<model>__<dataset>` for generation, `<stage>__<dataset>` else."""
    name = str(getattr(stage, "value", stage))
    first = slug(model) if name in STAGES and STAGES[name].dir_name == "model" else name
    return f"{first}__{slug(dataset)}"


def slug(value: object) -> str:
    """A filesystem-safe name for a model or dataset: `Qwen/Qwen3-4B` -> `Qwen3-4B`."""
    text = str(value).rstrip("/").split("://")[-1]
    text = text.split("/")[-1] or text
    text = text.split("*")[0].rsplit(".", 1)[0] if "." in text.split("/")[-1][-9:] else text
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-.")
    return safe or "run"
