"""gunicorn configuration of the demo: several worker processes with several threads each,
the way the original report's production ran:
``python -m gunicorn -c demo_site/demo/gunicorn_conf.py``.

Multi-process metrics: the runner sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory
before gunicorn starts; every worker writes its samples there and ``/metrics`` merges them.
``child_exit`` tells prometheus_client that a worker died, so its live gauges disappear.

No ``preload_app``: the application (and any database connection) is created in each worker
after the fork, never in the master (see conndiag's ``forked`` context).
"""

import os

wsgi_app = "demo.wsgi:application"
chdir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # demo_site/
pythonpath = chdir
bind = [os.environ.get("DEMO_BIND", "127.0.0.1:" + os.environ.get("DEMO_PORT", "8000"))]
workers = int(os.environ.get("DEMO_WORKERS", "3"))
threads = int(os.environ.get("DEMO_THREADS", "4"))
worker_class = "gthread"
preload_app = False
timeout = 30
graceful_timeout = 5
keepalive = 2
proc_name = "conndiag-demo"
accesslog = None  # conndiag and the site log every request's queries already
errorlog = "-"
loglevel = "info"


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
