"""The command line's one mapping from library errors to exit codes, and its assembly."""

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.common import fails_cleanly
from pipeline.errors import CheckpointError, ClusterError, ConfigError, DatasetError, InputError, StoreError


@pytest.mark.parametrize("error,code", [(ConfigError, 2), (InputError, 2), (DatasetError, 2), (CheckpointError, 2),
                                        (StoreError, 1), (ClusterError, 1)])
def test_fails_cleanly_maps_bad_input_to_2_and_other_failures_to_1(error, code):
    probe = typer.Typer()

    @probe.command()
    @fails_cleanly
    def cmd(name: str = typer.Option("x", help="a name")):
        raise error(f"{name} is wrong")

    result = CliRunner().invoke(probe, ["--name", "field"])
    assert result.exit_code == code
    assert "field is wrong" in result.output
    assert "Traceback" not in result.output


def test_every_command_group_is_assembled():
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == {"accuracy", "validate", "run", "status", "submit", "logs", "stop", "report", "compare", "sql",
                     "train", "bench"}


def test_bench_option_errors_exit_2_before_any_work():
    result = CliRunner().invoke(app, ["bench", "scaling", "--workers", "1,zero"])
    assert result.exit_code == 2
    assert "--workers" in result.output
