"""Metrics: what each rank reports after a step, and where it goes.

    snapshot    RankSnapshot (a frozen value), the MetricsSink interface, JsonlSink
    prometheus  PrometheusSink and its /metrics server (the names of DESIGN.md)

Imports prometheus_client and autobatch.planning.plan; never torch, Ray or the launcher.
"""
