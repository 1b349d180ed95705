"""The command line as a new user meets it: flags, validate's output, default names, class names, legends."""

from __future__ import annotations

from pathlib import Path

import pytest
from analytics_data import record
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.defense import defense_name, parse_defense
from pipeline.store import Store, records_to_table

pytestmark = pytest.mark.filterwarnings("ignore")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory) -> str:
    """A run folder of a CIFAR-10 job (its plan says so): one plain defense, one attack, 20 examples."""
    store = Store(str(tmp_path_factory.mktemp("runs") / "cifar-0001"))
    recs = [record(i, "plain-erm", "aa-standard", "adaptive", "Linf", 8 / 255, 1, {0, 3, 13}, {}) for i in range(20)]
    store.write_table("records/defense=plain-erm/attack=aa-standard/unit-0.parquet",
                      records_to_table(recs, run_id="cifar-0001", job_hash="j", unit_id="0", worker="w",
                                       config_hash="h"), {"unit_id": "0", "run_id": "cifar-0001", "job_hash": "j"})
    unit = {"unit_id": "0", "defense": "plain-erm", "attack": "aa-standard", "eps": 8 / 255, "example_ids": list(range(20)),
            "path": "records/defense=plain-erm/attack=aa-standard/unit-0.parquet", "defense_table": {"kind": "plain"},
            "attack_table": {"kind": "autoattack", "norm": "Linf", "eps": 8 / 255}}
    store.write_json("plan.json", {"run_id": "cifar-0001", "job_hash": "j", "format": 1, "units": [unit],
                                   "job": {"name": "c", "seed": 0, "data": {"dataset": "cifar10"}}})
    return store.uri


def test_flags_take_no_value(cifar_run):
    rows = [" ".join(line.split()) for line in invoke("report", "--help").output.splitlines() if "skip-bad" in line]
    assert rows and rows[0].startswith("│ --skip-bad --no-skip-bad leave out") and "<bool>" not in rows[0]
    for args in (["report", cifar_run, "--skip-bad", "true"], ["compare", cifar_run, "--a", "x", "--b", "y",
                                                                "--skip-bad", "false"],
                 ["sql", cifar_run, "--skip-bad", "yes", "SELECT 1"], ["status", "true"]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "is read as a run folder, and there is none of that name: flags take no value" in \
            " ".join(result.output.split()), result.output
    result = invoke("report", cifar_run, "--no-skip-bad", "--section", "headline", "--format", "json")
    assert result.exit_code == 0, result.output


def test_validate_prints_its_expansion_on_stdout(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('name = "v"\n[data]\ndataset = "digits"\nlimit = 4\n[[defenses]]\nkind = "plain"\n'
                   '[[defenses]]\nkind = "rdc"\nmodel = "optimal"\ntimesteps = 2\n'
                   '[[attacks]]\nkind = "pgd"\neps = ["8/255", "16/255"]\nsteps = 2\n')
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"ok {job}: run id v-") and lines[0].endswith("2 defenses, 2 attacks, 4 units")
    assert lines[1:] == ["  defense plain-erm", "  defense rdc-optimal", "  attack  pgd-ce eps=8/255 on plain-erm, rdc-optimal",
                         "  attack  pgd-ce eps=16/255 on plain-erm, rdc-optimal"]
    assert result.stderr == ""


@pytest.mark.parametrize("table, name", [
    ({"kind": "plain", "model": "robustbench:preact-resnet-18:models/cifar10/Linf/Wong2020Fast.pt"}, "plain-Wong2020Fast"),
    ({"kind": "mi", "mode": "pl", "model": "robustbench:wrn-28-10:models/cifar10/Linf/Standard.pt"}, "mi-pl-Standard"),
    ({"kind": "rdc", "model": "checkpoints/edm-cifar10"}, "rdc-edm-cifar10"),
    ({"kind": "rdc", "model": "edm:ckpt/edm-cifar10-32x32-cond-vp.pkl", "lm": {"steps": 2}},
     "rdc-edm-cifar10-32x32-cond-vp-lm"),
    ({"kind": "rdc", "model": "edm:rdc-cifar10-cond-edm:ckpt/edm_cifar_cond_vp.pt", "elbo": "edm"},
     "rdc-edm_cifar_cond_vp-edmw"),
    ({"kind": "plain", "model": "runs/my model/"}, "plain-my-model"),
    # Default models keep the names that describe them.
    ({"kind": "plain"}, "plain-erm"), ({"kind": "mi", "mode": "ol"}, "mi-ol"), ({"kind": "rdc"}, "rdc-unet"),
    ({"kind": "rdc", "model": "optimal"}, "rdc-optimal"),
])
def test_default_names_come_from_the_model(table, name):
    assert defense_name(parse_defense({"dataset": "cifar10", **table})) == name


def test_per_class_tables_name_the_classes(cifar_run):
    result = invoke("report", cifar_run, "--section", "classes", "--format", "markdown")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if line.startswith("| defense"))
    assert "| 0 airplane |" in header and "| 3 cat |" in header and "| 9 truck |" in header
    result = invoke("report", cifar_run, "--section", "classes", "--format", "csv")
    assert result.stdout.splitlines()[0].split(",")[5:7] == ["label", "class"]
    assert result.stdout.splitlines()[4].split(",")[5:7] == ["3", "cat"]


@pytest.mark.parametrize("lines", [3, 14, 24, 90])
def test_legends_stay_inside_the_figure(lines):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from pipeline.analytics.plots import DPI, FIGSIZE, _chart, _legend

    fig, ax = _chart()
    for i in range(lines):
        ax.plot([0, 1], [i, i], label=f"rdc-optimal-lm[timesteps={i},temperature=0.{i}] / aa-rand (adaptive+bpda)")
    _legend(fig, ax)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = fig.legends
    box, width, height = legend.get_window_extent(renderer), FIGSIZE[0] * DPI, FIGSIZE[1] * DPI
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, box
    chart = ax.get_window_extent(renderer)
    assert chart.width >= 0.5 * width and chart.height >= 0.3 * height, chart  # the chart keeps most of the figure
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == min(lines, 24) and (lines <= 24 or texts[-1] == "... and 67 more (see the summary table)")
