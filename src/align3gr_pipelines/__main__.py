"""`python -m align3gr_pipelines` runs the project like `kedro run`."""
import sys
from pathlib import Path

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project

from align3gr_pipelines.tracking import warning_filters


def main(*args, **kwargs):
    warning_filters.install()
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    interactive = hasattr(sys, "ps1")
    kwargs["standalone_mode"] = not interactive
    run = find_run_command(package_name)
    return run(*args, **kwargs)


if __name__ == "__main__":
    main()
