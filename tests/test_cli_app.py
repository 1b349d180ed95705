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

    result = CliRunner().invoke(probe, ["--name", "rdc[temperature=0.5]"])
    assert result.exit_code == code
    assert "rdc[temperature=0.5] is wrong" in result.output
    assert "Traceback" not in result.output


def test_every_command_group_is_assembled():
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == {"accuracy", "validate", "plan", "run", "status", "submit", "logs", "stop", "report", "compare", "sql",
                     "train", "bench", "import-model", "models"}


def test_bench_option_errors_exit_2_before_any_work():
    result = CliRunner().invoke(app, ["bench", "scaling", "--workers", "1,zero"])
    assert result.exit_code == 2
    assert "--workers" in result.output


def test_run_options_are_checked_once_and_become_the_run_flags():
    from pipeline.config.run import RunOptions

    options = RunOptions(out="s3://b/p", workers=4, gpus_per_worker=0.25, min_gpus=8, endpoint_url="http://s3:9000",
                         run_id="r1", fresh=True, report=False, unit_timeout=90, speculate=True)
    assert options.run_flags() == ["--out", "s3://b/p", "--workers", "4", "--run-id", "r1", "--fresh",
                                   "--endpoint-url", "http://s3:9000", "--no-report", "--gpus-per-worker", "0.25",
                                   "--min-gpus", "8", "--unit-timeout", "90", "--speculate"]
    assert RunOptions().run_flags() == []  # defaults are the run command's own
    for command in ("run", "submit"):  # submit hands the same flags to the cluster's run
        help_text = CliRunner().invoke(app, [command, "--help"]).output
        assert all(f in help_text for f in options.run_flags() if f.startswith("--")), command
    for bad, field in [({"gpus_per_worker": 0}, "--gpus-per-worker"), ({"workers": 0}, "--workers"),
                       ({"min_gpus": -1}, "--min-gpus"), ({"unit_timeout": 0}, "--unit-timeout")]:
        with pytest.raises(ConfigError, match=field):
            RunOptions(**bad)


def test_validate_lists_swept_names_with_their_suffix(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[data]\ndataset = "digits"\nlimit = 2\n'
                   '[[defenses]]\nkind = "rdc"\nmodel = "optimal"\ntimesteps = 2\n'
                   '[defenses.sweep]\ntemperature = [0.5, 1.0]\n'
                   '[[attacks]]\nkind = "transfer"\nsurrogate = { kind = "plain" }\nattack = { kind = "pgd", eps = 0.25 }\n')
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 0
    assert "attack  transfer-pgd-ce eps=0.25 on" in result.output  # the crafting attack's eps
    assert "defense rdc-optimal[temperature=0.5]" in result.output
    assert "defense rdc-optimal[temperature=1.0]" in result.output
    assert "(surrogate plain-erm)" in result.output
