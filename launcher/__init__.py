"""The launcher: one job on a Ray cluster (`launcher.job`), and the daemon that queues many
(`launcher.daemon`); `launcher.cli` is the `autobatch` command; `launcher.errors` every
error they raise on purpose. The library (`autobatch`) never imports the launcher.

May import: autobatch, launcher.daemon, launcher.job.
"""
