"""Every `kedro` and `make` command in the README runs as written: the Kedro CLI (with the project's own
commands and the installed plugins) accepts its command path and options, its --pipelines and --env name
things that exist, and every make target is in the Makefile. Nothing is run: parsing only."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def fenced_commands(text: str, program: str) -> list[str]:
    """Lines of ```bash blocks that call `program` (after any VAR=value prefixes), comments stripped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for raw in re.sub(r"\\\n\s*", " ", block).splitlines():  # join `\` continuations
            line = raw.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            while words and ENV_ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words and words[0] == program:
                lines.append(shlex.join(words))
    return lines


KEDRO_LINES = fenced_commands(README.read_text(), "kedro")
MAKE_LINES = fenced_commands(README.read_text(), "make")


def test_the_readme_has_the_commands_we_check():
    assert any(line.startswith("kedro run --pipelines=full") for line in KEDRO_LINES), KEDRO_LINES
    assert {"make run", "make test"} <= set(MAKE_LINES), MAKE_LINES


def test_fenced_commands_parses_prefixes_and_comments():
    text = "```bash\nFOO=1 kedro run --env x   # a comment\n# kedro not this\nmake run\n```\n"
    assert fenced_commands(text, "kedro") == ["kedro run --env x"]
    assert fenced_commands(text, "make") == ["make run"]


@pytest.fixture(scope="module")
def kedro_cli():
    from kedro.framework.cli.cli import KedroCLI

    return KedroCLI(REPO)


def _resolve(cli: click.Group, words: list[str]) -> tuple[click.Command, list[str], str]:
    cmd, path = cli, []
    ctx = click.Context(cli)
    while isinstance(cmd, click.Group) and words and not words[0].startswith("-"):
        sub = cmd.get_command(ctx, words[0])
        if sub is None:
            raise AssertionError(f"`kedro {' '.join(path + words)}`: no command {words[0]!r} under "
                                 f"`kedro {' '.join(path)}` (has {sorted(cmd.list_commands(ctx))})")
        path.append(words.pop(0))
        cmd = sub
    return cmd, words, " ".join(path)


@pytest.mark.parametrize("line", KEDRO_LINES)
def test_kedro_accepts_the_readme_command(kedro_cli, line):
    from align3gr_pipelines.pipeline_registry import register_pipelines

    cmd, rest, path = _resolve(kedro_cli, shlex.split(line)[1:])
    assert not isinstance(cmd, click.Group), f"`{line}` stops at the command group `kedro {path}`"
    try:
        ctx = cmd.make_context(path, list(rest), resilient_parsing=False)
    except click.UsageError as err:
        pytest.fail(f"README command `{line}`: {err.format_message()}")
    pipelines = ctx.params.get("pipelines") or ctx.params.get("pipeline")
    for name in ([pipelines] if isinstance(pipelines, str) else pipelines or []):
        for one in str(name).split(","):
            assert one in register_pipelines(), f"`{line}`: no pipeline {one!r}"
    env = ctx.params.get("env")
    if env:
        assert (REPO / "conf" / env).is_dir(), f"`{line}`: no conf/{env}"


@pytest.mark.parametrize("line", MAKE_LINES)
def test_make_targets_exist(line):
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    for target in shlex.split(line)[1:]:
        assert target in targets, f"README `{line}`: no target {target!r} in the Makefile ({sorted(targets)})"
