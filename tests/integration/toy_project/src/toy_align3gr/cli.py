"""The real project's CLI (`kedro lineage ...`)."""
from align3gr_pipelines.cli import cli, run  # noqa: F401
