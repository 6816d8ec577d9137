"""A small site for the dashboards' end-to-end test: gunicorn serves it, Prometheus scrapes it."""
