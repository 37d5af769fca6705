"""The benchmark report: a versioned JSON schema, a markdown rendering and PNG plots.

One directory per run holds ``report.json`` (:class:`Report`), ``report.md``
and the plots. The report carries the cost model fitted on its single-stream
runs (:mod:`engine.bench.cost_model`) and the configuration its jobs ran in
(:class:`RunConfig`). Knows nothing of torch nor of pricing: :mod:`engine.pricing`
reads reports through these models.

Schema history: ``aitbc-engine.bench/2`` added ``cost_model`` (and
``no_cost_model``), ``environment.run_config`` and ``config.decode`` /
``config.batch_size``. Reports of schema ``/1`` are still read: their cost
model is fitted on reading, and their run configuration is unknown (None).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from engine.base import StrictModel
from engine.bench.cost_model import CostModel, CostModelError, fit_cost_model
from engine.bench.roofline import Roofline
from engine.bench.stats import Summary
from engine.errors import EngineError

SCHEMA_VERSION = "aitbc-engine.bench/2"
SCHEMA_V1 = "aitbc-engine.bench/1"  # read, upgraded on reading (see the module doc)

Scenario = Literal["load", "single", "offline"]
ALL_SCENARIOS: tuple[Scenario, ...] = ("load", "single", "offline")
Decode = Literal["auto", "dynamic", "static"]  # the Engine's decode option


class ReportError(EngineError):
    """A report file is missing, unreadable, or not of a schema this engine reads."""

    code = "invalid_report"


class RunConfig(StrictModel):
    """The configuration jobs run in, as far as it moves their time.

    ``aitbc-engine run``, ``serve`` and ``mine`` run jobs in the engine's
    defaults (torch's default intra-op thread count, ``default_batch_size`` of
    the devices, ``decode="auto"``, the CPU linear kernel unless
    ``AITBC_ENGINE_LINEAR=blas``, the registry's dtype for the device) unless
    their options say otherwise; ``bench`` runs its single-stream jobs the same
    way and records the configuration they ran in. An estimate holds for the
    configuration of its profile.
    """

    device_class: str  # "cpu" or "cuda:<gpu_type>"
    dtype: str
    torch_threads: int  # torch intra-op threads while the jobs ran
    batch_size: int  # the engine's batch size: jobs of one model that may decode together
    decode: Decode  # the single-job decode path asked for
    linear_kernel: str  # "blas" or "row-invariant" (the engine's CPU kernel)

    def differences(self, other: RunConfig) -> list[tuple[str, object, object]]:
        """``(field, this value, other value)`` for each field where ``other`` differs."""
        return [(name, getattr(self, name), getattr(other, name))
                for name in type(self).model_fields if getattr(self, name) != getattr(other, name)]


class Environment(StrictModel):
    """Where and with what the benchmark ran."""

    engine_version: str
    python_version: str
    torch_version: str | None
    transformers_version: str | None
    platform: str
    device: dict[str, Any]  # engine.hardware.Device.to_dict()
    driver_version: str | None
    cuda_version: str | None
    cpu_name: str
    cpu_cores: int
    torch_threads: int
    model: str
    architecture: str
    parameters: int
    weights: Literal["pretrained", "random"]
    weights_digest: str
    dtype: str
    device_class: str
    # The configuration the single-stream jobs ran in (None: a schema /1 report, not recorded).
    run_config: RunConfig | None = None


class BenchConfig(StrictModel):
    """What was asked for."""

    model: str
    weights: Literal["pretrained", "random"] = "pretrained"
    device: str | None = None
    dtype: str | None = None
    scenarios: list[Scenario] = Field(default_factory=lambda: list(ALL_SCENARIOS))
    prompt_tokens: list[int] = Field(default_factory=lambda: [32, 128, 512])
    new_tokens: list[int] = Field(default_factory=lambda: [32, 128])
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    offline_prompt_tokens: int = 128
    offline_new_tokens: int = 32
    min_runs: int = 5
    min_seconds: float = 5.0
    max_runs: int = 200
    warmup_runs: int = 1
    load_repeats: int = 2
    threads: int | None = None  # torch intra-op threads (CPU); None: torch's default, as jobs
    decode: Decode = "auto"  # the engine's decode option, as `run --decode`
    batch_size: int | None = None  # the single-stream engine's; None: the engine's default
    seed: int = 0
    quick: bool = False


class RunRecord(StrictModel):
    """One measured job, raw (seconds)."""

    job_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_seconds: float  # client side: submit to result
    execution_seconds: float  # the engine's meter (Metrics.execution_time_seconds)
    ttft_seconds: float | None
    tpot_seconds: float | None
    inter_token_seconds: list[float]
    gpu_seconds: float
    queue_seconds: float | None = None
    commitment_seconds: float | None = None  # the activation commitment pass, in execution
    energy_joules: float | None = None
    peak_memory_bytes: int | None = None
    batched: bool = False
    batch_size: int = 1
    measurement: str = ""


class BatchRecord(StrictModel):
    """One offline batch: jobs submitted at once, and the wall time until all were done."""

    wall_seconds: float
    jobs: list[RunRecord]


class PointMetrics(StrictModel):
    """Every metric of one point, summarised over its measured runs."""

    runs: int
    measured_seconds: float
    mean_prompt_tokens: float
    mean_completion_tokens: float
    ttft: Summary | None
    tpot: Summary | None
    itl: Summary | None
    latency: Summary
    execution_time: Summary
    output_tokens_per_s: float
    total_tokens_per_s: float
    requests_per_s: float
    decode_tokens_per_s: float | None
    peak_memory_bytes: int | None
    energy_joules: Summary | None
    tokens_per_joule: float | None
    gpu_seconds_per_1k_tokens: float | None
    device_seconds_per_1k_tokens: float
    roofline_bound_tokens_per_s: float | None
    roofline_efficiency: float | None


class LoadResult(StrictModel):
    """Model load: cold (first in this process), reloads, and a warm pool hit."""

    cold_load_seconds: float
    reload_seconds: list[float]
    reload: Summary | None
    pool_hit_seconds: float
    weight_bytes: int
    memory_after_load_bytes: int | None
    memory_method: str
    note: str


class SinglePoint(StrictModel):
    """Single-stream: one job at a time at one (prompt length, new tokens) shape."""

    prompt_tokens: int
    new_tokens: int
    warmup_runs: int
    metrics: PointMetrics
    runs: list[RunRecord]


class OfflinePoint(StrictModel):
    """Offline: ``batch_size`` jobs submitted at once, repeated."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    warmup_batches: int
    batching: str
    observed_batch_sizes: list[int]
    metrics: PointMetrics
    batches: list[BatchRecord]


class Checks(StrictModel):
    """Internal consistency of the report (relative deviations; small is good)."""

    max_throughput_deviation: float  # |throughput * latency / tokens - 1| over points
    max_timeline_deviation: float  # |(ttft + (n-1) * tpot + commitment) / execution - 1|


class Report(StrictModel):
    """A whole benchmark run (``report.json``)."""

    schema_version: str = SCHEMA_VERSION
    created_at: str
    duration_seconds: float
    environment: Environment
    config: BenchConfig
    policy: dict[str, str]
    roofline: Roofline | None
    load: LoadResult | None = None
    single_stream: list[SinglePoint] = Field(default_factory=list)
    offline: list[OfflinePoint] = Field(default_factory=list)
    checks: Checks
    notes: list[str] = Field(default_factory=list)
    # The fast path's decoders (engine.tasks.static_decode.DecoderStats): warm-up seconds,
    # captures and replays per model, dtype and cache-length bucket.
    fast_paths: list[dict[str, Any]] = Field(default_factory=list)
    # Fitted on the single-stream runs (with_cost_model); None with the reason in no_cost_model.
    cost_model: CostModel | None = None
    no_cost_model: str | None = None

    def single_runs(self) -> list[RunRecord]:
        """Every measured single-stream run (the raw data a cost model is fitted on)."""
        return [r for p in self.single_stream for r in p.runs]


def with_cost_model(report: Report) -> Report:
    """``report`` with the cost model fitted on its single-stream runs (or the reason why not)."""
    try:
        return report.model_copy(update={"cost_model": fit_cost_model(report.single_runs()),
                                         "no_cost_model": None})
    except CostModelError as exc:
        return report.model_copy(update={"cost_model": None, "no_cost_model": exc.message})


def read_report(path: str | Path) -> Report:
    """Read ``report.json`` (or the directory holding it), checking the schema version."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot read the report {p}: {exc.strerror or exc}; run "
                          "`aitbc-engine bench MODEL --out DIR` to make one",
                          field="profile") from exc
    except (ValueError, RecursionError) as exc:
        raise ReportError(f"the report {p} is not JSON: {exc}", field="profile") from exc
    found = raw.get("schema_version") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or found not in (SCHEMA_VERSION, SCHEMA_V1):
        raise ReportError(f"the report {p} has schema {found!r}; this engine reads "
                          f"{SCHEMA_VERSION!r} and {SCHEMA_V1!r} (run the benchmark again)",
                          field="profile")
    try:
        report = Report.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ReportError(f"the report {p} is invalid at {where}: {first['msg']}",
                          field="profile") from exc
    if found == SCHEMA_V1:
        upgraded = with_cost_model(report)
        return upgraded.model_copy(update={"schema_version": SCHEMA_VERSION, "notes": [
            *upgraded.notes, f"read from a {SCHEMA_V1} report: cost model fitted on reading; "
            "the configuration its jobs ran in was not recorded"]})
    return report


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``; the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    plots = write_plots(report, out)
    md_path = out / "report.md"
    md_path.write_text(render_markdown(report, [p.name for p in plots]), encoding="utf-8")
    return [json_path, md_path, *plots]


# ------------------------------------------------------------------ markdown

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _mb(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n"


def render_markdown(report: Report, plot_names: list[str] | None = None) -> str:
    """``report.md``: the tables a person reads."""
    env, cfg = report.environment, report.config
    parts = [f"# Benchmark: {env.model} on {env.device.get('name', env.device_class)}\n\n",
             f"{report.created_at}, {report.duration_seconds:.0f} s, schema "
             f"`{report.schema_version}`" + (" (quick)" if cfg.quick else "") + "\n\n"]
    parts.append("## Environment\n\n")
    parts.append(_table(["field", "value"], [
        ["model", f"{env.model} ({env.architecture}, {env.parameters / 1e6:.1f}M parameters)"],
        ["weights", f"{env.weights}, digest `{env.weights_digest}`"],
        ["dtype / device class", f"{env.dtype} / {env.device_class}"],
        ["device", f"{env.device.get('id')}: {env.device.get('name')}"],
        ["driver / CUDA", f"{env.driver_version or '-'} / {env.cuda_version or '-'}"],
        ["CPU", f"{env.cpu_name} ({env.cpu_cores} cores, torch threads {env.torch_threads})"],
        ["jobs ran in", _run_config_text(env.run_config)],
        ["torch / transformers", f"{env.torch_version} / {env.transformers_version}"],
        ["engine / python", f"{env.engine_version} / {env.python_version}"],
    ]))
    parts.append("## Method\n\n")
    parts += [f"- **{k}**: {v}\n" for k, v in report.policy.items()]
    if report.roofline is not None:
        r = report.roofline
        parts.append(f"- **roofline**: `{r.formula}`; bandwidth {r.bandwidth_gbps:.1f} GB/s "
                     f"({r.bandwidth_source}); weights {r.weight_bytes / 2**20:.0f} MiB; KV "
                     f"{r.kv_bytes_per_token} bytes/token\n")
    parts.append("\n")
    if report.load is not None:
        ld = report.load
        parts.append("## Load\n\n")
        parts.append(_table(
            ["cold load s", "reload s (mean)", "pool hit ms", "weights MiB",
             "memory after load MiB"],
            [[_num(ld.cold_load_seconds, 2), _num(ld.reload.mean if ld.reload else None, 2),
              _num(ld.pool_hit_seconds * 1000, 3), _mb(ld.weight_bytes),
              _mb(ld.memory_after_load_bytes)]]))
        parts.append(f"{ld.note} Memory: {ld.memory_method}.\n\n")
    if report.single_stream:
        parts.append("## Single stream\n\n")
        rows = []
        for p in report.single_stream:
            m = p.metrics
            rows.append([str(p.prompt_tokens), str(p.new_tokens), str(m.runs),
                         _num(m.mean_completion_tokens),
                         _ms(m.ttft.p50 if m.ttft else None), _ms(m.ttft.p99 if m.ttft else None),
                         _ms(m.tpot.mean if m.tpot else None), _ms(m.tpot.p99 if m.tpot else None),
                         _ms(m.itl.p50 if m.itl else None), _ms(m.itl.p99 if m.itl else None),
                         _num(m.latency.p50, 3), _num(m.latency.p99, 3),
                         _num(m.output_tokens_per_s), _num(m.requests_per_s, 2),
                         _mb(m.peak_memory_bytes), _num(m.roofline_bound_tokens_per_s),
                         _num(None if m.roofline_efficiency is None
                              else 100 * m.roofline_efficiency)])
        parts.append(_table(["prompt", "new", "runs", "out tok", "TTFT p50 ms", "TTFT p99 ms",
                             "TPOT mean ms", "TPOT p99 ms", "ITL p50 ms", "ITL p99 ms",
                             "latency p50 s", "latency p99 s", "out tok/s", "req/s",
                             "peak MiB", "roofline tok/s", "roofline %"], rows))
    if report.offline:
        parts.append("## Offline (batched)\n\n")
        rows = []
        for op in report.offline:
            m = op.metrics
            rows.append([str(op.batch_size), op.batching,
                         ",".join(map(str, op.observed_batch_sizes)), str(len(op.batches)),
                         _ms(m.ttft.p50 if m.ttft else None),
                         _ms(m.tpot.mean if m.tpot else None), _num(m.latency.p50, 3),
                         _num(m.output_tokens_per_s), _num(m.total_tokens_per_s),
                         _num(m.requests_per_s, 2), _num(m.decode_tokens_per_s),
                         _num(m.roofline_bound_tokens_per_s),
                         _num(None if m.roofline_efficiency is None
                              else 100 * m.roofline_efficiency),
                         _num(m.device_seconds_per_1k_tokens, 2)])
        parts.append(f"Each batch: {report.offline[0].prompt_tokens}-token prompts, "
                     f"{report.offline[0].new_tokens} new tokens.\n\n")
        parts.append(_table(["batch", "batching", "observed", "batches", "TTFT p50 ms",
                             "TPOT mean ms", "latency p50 s", "out tok/s", "total tok/s",
                             "req/s", "decode tok/s", "roofline tok/s", "roofline %",
                             "device s / 1k tok"], rows))
    fit_text = _cost_model_section(report)
    if fit_text:
        parts.append(fit_text)
    parts.append("## Checks\n\n")
    parts.append(f"- throughput x latency vs tokens: max deviation "
                 f"{100 * report.checks.max_throughput_deviation:.2f}%\n"
                 f"- TTFT + (n-1) x TPOT vs execution time: max deviation "
                 f"{100 * report.checks.max_timeline_deviation:.2f}%\n")
    for note in report.notes:
        parts.append(f"- {note}\n")
    if plot_names:
        parts.append("\n## Plots\n\n")
        parts += [f"![{n}]({n})\n" for n in plot_names]
    return "".join(parts)


def _run_config_text(rc: RunConfig | None) -> str:
    if rc is None:
        return "not recorded"
    return (f"{rc.device_class}, {rc.dtype}, {rc.torch_threads} torch thread(s), batch size "
            f"{rc.batch_size}, decode {rc.decode}, linear layers {rc.linear_kernel}")


def _cost_model_section(report: Report) -> str:
    fit = report.cost_model
    if fit is None:
        return f"## Cost model\n\nNone: {report.no_cost_model}\n\n" if report.single_stream \
            else ""
    return ("## Cost model\n\n"
            f"execution seconds = {fit.fixed_seconds:.4f} + {fit.prefill_seconds_per_token:.6f}"
            f" x prompt tokens + {fit.decode_seconds_per_token:.5f} x output tokens "
            f"(least squares over {fit.points} single-stream runs; RMSE "
            f"{fit.rmse_seconds:.4f} s, max relative error {100 * fit.max_relative_error:.1f}%)."
            "\n\n")


# ------------------------------------------------------------------ plots

def write_plots(report: Report, out: Path) -> list[Path]:
    """PNG plots (matplotlib, Agg): throughput vs batch size, TTFT/TPOT vs prompt, latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    title = f"{report.environment.model} on {report.environment.device_class}"
    if report.offline:
        fig, ax = plt.subplots(figsize=(6, 4))
        sizes = [p.batch_size for p in report.offline]
        ax.plot(sizes, [p.metrics.output_tokens_per_s for p in report.offline], "o-",
                label="output tokens/s (measured)")
        bounds = [p.metrics.roofline_bound_tokens_per_s for p in report.offline]
        if all(b is not None for b in bounds):
            ax.plot(sizes, [float(b or 0.0) for b in bounds], "--", color="grey",
                    label="decode roofline bound")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"Throughput vs batch size: {title}")
        ax.legend()
        ax.grid(True, alpha=0.3)
        paths.append(_save(fig, out / "throughput_vs_batch_size.png"))
    if report.single_stream:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for n in sorted({p.new_tokens for p in report.single_stream}):
            pts = sorted((p for p in report.single_stream if p.new_tokens == n),
                         key=lambda p: p.prompt_tokens)
            xs = [p.prompt_tokens for p in pts]
            ax1.plot(xs, [1000 * p.metrics.ttft.p50 if p.metrics.ttft else float("nan")
                          for p in pts], "o-", label=f"{n} new tokens")
            ax2.plot(xs, [1000 * p.metrics.tpot.mean if p.metrics.tpot else float("nan")
                          for p in pts], "o-", label=f"{n} new tokens")
        ax1.set_title("TTFT (p50) vs prompt length")
        ax2.set_title("TPOT (mean) vs prompt length")
        for ax in (ax1, ax2):
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("ms")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        paths.append(_save(fig, out / "ttft_tpot_vs_prompt_length.png"))
    groups: list[tuple[str, list[float]]] = []
    for sp in report.single_stream:
        groups.append((f"P{sp.prompt_tokens}/N{sp.new_tokens}",
                       [r.latency_seconds for r in sp.runs]))
    for op in report.offline:
        groups.append((f"B{op.batch_size}", [j.latency_seconds for b in op.batches
                                              for j in b.jobs]))
    itl = [v for sp in report.single_stream for r in sp.runs for v in r.inter_token_seconds]
    if groups:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.boxplot([g[1] for g in groups], showfliers=True)
        ax1.set_xticks(range(1, len(groups) + 1), [g[0] for g in groups], rotation=45,
                       ha="right", fontsize=8)
        ax1.set_ylabel("end-to-end latency, s")
        ax1.set_title("Latency per run (P prompt / N new; B batch)")
        ax1.grid(True, alpha=0.3)
        if itl:
            ax2.hist([1000 * v for v in itl], bins=40)
            ax2.set_xlabel("inter-token latency, ms")
            ax2.set_ylabel("tokens")
            ax2.set_title("Inter-token latency (single stream)")
        else:
            ax2.axis("off")
        fig.suptitle(title)
        paths.append(_save(fig, out / "latency_distribution.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
