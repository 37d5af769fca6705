"""The API's Prometheus metrics, on their own registry: jobs, durations, GPU seconds, energy."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from engine.executor import Engine
from engine.jobqueue import JobQueue
from engine.jobs import JobResult


class _LiveCollector:
    """Gauges read from the engine and the job queue at scrape time."""

    def __init__(self, engine: Engine, queue: JobQueue):
        self._engine = engine
        self._queue = queue

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        engine = self._engine
        queued, running = engine.queue_length(), engine.running_count()
        jobs = GaugeMetricFamily("aitbc_engine_jobs", "Jobs in the engine now, by state",
                                 labels=["state"])
        jobs.add_metric(["queued"], queued)
        jobs.add_metric(["running"], running)
        yield jobs
        yield GaugeMetricFamily("aitbc_engine_queue_length", "Jobs waiting for a device",
                                value=queued)
        yield GaugeMetricFamily("aitbc_engine_jobs_in_flight",
                                "Jobs accepted by the API and not finished",
                                value=self._queue.store.active_count())
        warm = GaugeMetricFamily("aitbc_engine_models_loaded", "Warm models, by model",
                                 labels=["model"])
        counts: dict[str, int] = {}
        for loaded in engine.pool.warm():
            counts[loaded.spec.name] = counts.get(loaded.spec.name, 0) + 1
        for name, n in sorted(counts.items()):
            warm.add_metric([name], n)
        yield warm


class ApiMetrics:
    """The metrics; a :class:`~engine.jobqueue.JobEvents` listener of the job queue."""

    def __init__(self, engine: Engine, queue: JobQueue):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("aitbc_engine_jobs_finished", "Jobs finished, by model and outcome",
                            ["model", "status"], registry=r)
        self.rejections = Counter("aitbc_engine_jobs_rejected",
                                  "Jobs refused before running, by error code", ["code"],
                                  registry=r)
        self.duration = Histogram(
            "aitbc_engine_job_duration_seconds", "Execution time of completed jobs", ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                     600), registry=r)
        self.queue_wait = Histogram(
            "aitbc_engine_job_queue_seconds", "Time completed jobs waited for a device",
            ["model"], buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=r)
        self.gpu_seconds = Counter("aitbc_engine_gpu_seconds", "GPU seconds held by jobs",
                                   ["model"], registry=r)
        self.energy = Counter("aitbc_engine_energy_joules",
                              "Energy measured by NVML for jobs (absent where not measured)",
                              ["model"], registry=r)
        self.tokens = Counter("aitbc_engine_tokens", "Tokens processed, by kind",
                              ["model", "kind"], registry=r)
        r.register(_LiveCollector(engine, queue))

    def rejected(self, code: str) -> None:
        """Count a job refused before running."""
        self.rejections.labels(code).inc()

    def finished(self, result: JobResult) -> None:
        """Count a finished job."""
        status = ("cancelled" if result.error is not None and result.error.code == "cancelled"
                  else result.status)
        self.jobs.labels(result.model, status).inc()
        m = result.metrics
        if m is None:
            return
        # A job that stopped early (cancelled, timed out) held its device time all the same.
        self.gpu_seconds.labels(result.model).inc(m.gpu_time_seconds)
        if m.energy_joules is not None:
            self.energy.labels(result.model).inc(m.energy_joules)
        if not result.ok:
            return
        self.duration.labels(result.model).observe(m.execution_time_seconds)
        if m.queue_seconds is not None:
            self.queue_wait.labels(result.model).observe(max(0.0, m.queue_seconds))
        self.tokens.labels(result.model, "prompt").inc(m.prompt_tokens)
        self.tokens.labels(result.model, "completion").inc(m.completion_tokens)
