"""`python -m pipeline.cli`: how a cluster's job entrypoint calls the command line."""

from pipeline.cli import app

app()
