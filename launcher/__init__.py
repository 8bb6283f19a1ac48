"""The launcher: one job on a Ray cluster (`launcher.job`), and the daemon that queues many
(`launcher.daemon`); `launcher.cli` is the `autobatch` command. Imports the library
(`autobatch`); the library never imports the launcher.
"""
