"""Metrics: what each rank reports after a step, and where it goes.

    snapshot    RankSnapshot (a frozen value), the MetricsSink interface, JsonlSink
    families    the metric families: name, snapshot field, HELP (docs/metrics.md)
    prometheus  PrometheusSink: the latest snapshot per rank, as Prometheus text
    server      MetricsServer: GET /metrics over HTTP for a sink

May import: autobatch.planning.plan; never: torch, ray, launcher.
"""
