"""Prometheus metrics of one process, in their own registry so tests can make fresh ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Counters and histograms the SCP, STOW-RS intake, sweep, workers and exporters update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "fvlm_instances_received_total", "Instances stored", ["source"], registry=r
        )
        self.bytes_received = Counter(
            "fvlm_bytes_received_total", "Bytes of instances stored", ["source"], registry=r
        )
        self.instances_rejected = Counter(
            "fvlm_instances_rejected_total", "Instances refused", ["source", "reason"], registry=r
        )
        self.associations = Counter(
            "fvlm_associations_total", "DICOM associations by outcome", ["outcome"], registry=r
        )
        self.associations_active = Gauge(
            "fvlm_associations_active", "Open DICOM associations", registry=r
        )
        self.jobs_created = Counter("fvlm_jobs_created_total", "Jobs enqueued", registry=r)
        self.job_duration = Histogram(
            "fvlm_job_duration_seconds",
            "Pipeline run time per job attempt",
            ["outcome"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.queue_depth = Gauge(
            "fvlm_jobs", "Jobs by state (read from the database at scrape)", ["state"], registry=r
        )
        self.exports = Gauge(
            "fvlm_exports",
            "Exports by destination and state (read from the database at scrape)",
            ["destination", "state"],
            registry=r,
        )
        self.export_duration = Histogram(
            "fvlm_export_send_seconds",
            "Time of one export attempt (all objects of a result to one destination)",
            ["destination", "outcome"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
