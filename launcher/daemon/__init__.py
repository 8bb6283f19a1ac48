"""The daemon: a queue of jobs in SQLite, each run by launcher.job's JobController.

    daemon     Daemon: scheduling loop, job threads, state transitions (one place)
    store      SQLite job records and transitions;  scheduler  which queued jobs start
    jobwatch   a job's runner events -> store, log, metrics
    api        the FastAPI app;  serve  `autobatch serve`;  client  the CLI's commands
    keeper     `autobatch serve`'s process: the socket, a daemon process kept on it
    rayhead    the state directory's Ray head;  raylink  the daemon's connection to Ray
    limits     every bound a request has;  guards  connection, token and body guards
    body       bounded JSON/YAML parsing in worker processes

May import: autobatch, launcher.errors, launcher.job.
"""
