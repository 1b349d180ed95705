"""Comparisons (McNemar, paired bootstrap), RobustBench-style exports, SQL over local and S3
runs, and the analytics commands' output and exit codes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from analytics_data import write_sweep
from typer.testing import CliRunner

from pipeline.analytics import connect
from pipeline.analytics.compare import bootstrap_difference, compare, mcnemar_chi2, mcnemar_exact, paired_counts
from pipeline.analytics.export import robustbench_entries, write_robustbench
from pipeline.analytics.source import open_runs
from pipeline.analytics.sql import arrow_csv, run_sql
from pipeline.cli import app
from pipeline.errors import InputError

T5, T20 = "rdc-optimal[timesteps=5]", "rdc-optimal[timesteps=20]"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> str:
    return write_sweep(str(tmp_path_factory.mktemp("runs") / "sweep-0001"))


def binomial_tail(k: int, n: int) -> float:
    """P(X <= k), X ~ Binomial(n, 1/2), in exact integers."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


@pytest.mark.slow
def test_robustbench_entries_describe_the_real_model(ray_cluster, tmp_path):
    """The exports name the model each defense stands on, as the run's plan.json records it."""
    from pipeline.config.job import parse_job
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.models.registry import build_model
    from pipeline.config.run import RunOptions
    from pipeline.runtime import run_job

    model = build_model({"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 8})
    extra = save_checkpoint(tmp_path / "extra", model, model.config, {"additional_data": True})
    plain = save_checkpoint(tmp_path / "plain", model, model.config, {})
    job = parse_job({
        "name": "cards", "data": {"dataset": "digits", "limit": 2, "shard_size": 2},
        "defenses": [{"kind": "plain", "model": str(extra), "method": "mixup", "name": "extra"},
                     {"kind": "mi", "model": str(plain), "method": "erm", "name": "mi"},
                     {"kind": "rdc", "model": "optimal", "timesteps": 2, "name": "rdc"}],
        "attacks": [{"kind": "pgd", "eps": 0.1, "steps": 1, "passes": 1}],
    })
    result = run_job(job, RunOptions(out=str(tmp_path / "out"), workers=1), progress=False)
    assert result.ok
    runs = open_runs([result.uri])
    entries = {e["name"]: e for e in robustbench_entries(connect([result.uri]), plans=[p for _, p in runs], runs=runs)}
    assert (entries["extra"]["architecture"], entries["extra"]["additional_data"]) == ("SmallCNN (mixup)", True)
    assert (entries["mi"]["architecture"], entries["mi"]["additional_data"]) == ("SmallCNN (erm) + MI-PL", None)
    assert (entries["rdc"]["architecture"], entries["rdc"]["additional_data"]) == ("RDC on the optimal eps model", False)


# --- McNemar and the bootstrap ----------------------------------------------------------------------------------

def test_mcnemar_exact_known_tables():
    assert mcnemar_exact(2, 4) == pytest.approx(2 * (1 + 6 + 15) / 64)  # 0.6875
    assert mcnemar_exact(15, 5) == pytest.approx(2 * 21700 / 2**20, rel=1e-12)  # 0.0414
    assert mcnemar_exact(5, 15) == mcnemar_exact(15, 5)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    # Large counts: the log-space sum against exact integer arithmetic.
    assert mcnemar_exact(480, 560) == pytest.approx(2 * binomial_tail(480, 1040), rel=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(2, 4), (15, 5), (40, 61), (0, 7)]:
        assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_chi2_continuity_corrected():
    stat, p = mcnemar_chi2(15, 5)
    assert stat == pytest.approx(81 / 20)  # (|15 - 5| - 1)^2 / 20
    assert p == pytest.approx(0.044171, abs=1e-6)
    assert mcnemar_chi2(0, 0) == (0.0, 1.0) and mcnemar_chi2(3, 4)[0] == 0.0
    scipy_stats = pytest.importorskip("scipy.stats")
    assert p == pytest.approx(scipy_stats.chi2.sf(81 / 20, 1), rel=1e-12)


def test_bootstrap_is_seeded_and_matches_resampling_pairs():
    counts = (50, 12, 4, 34)  # n11, n10, n01, n00: A ahead by 8 points
    lo, hi = bootstrap_difference(*counts, resamples=20_000, seed=3)
    assert (lo, hi) == bootstrap_difference(*counts, resamples=20_000, seed=3)
    other = bootstrap_difference(*counts, resamples=20_000, seed=4)
    assert other == pytest.approx((lo, hi), abs=0.011)  # another seed moves the bounds by at most a pair
    assert lo < 0.08 < hi and -0.011 < lo < 0.011  # 12 against 4 discordant pairs: borderline at 95%
    # The multinomial shortcut against resampling the 100 pairs themselves (a different stream,
    # so the bounds agree to Monte Carlo error, about a point here).
    pairs = np.repeat([0.0, 1.0, -1.0, 0.0], counts)  # A right - B right, per example
    rng = np.random.default_rng(0)
    diffs = pairs[rng.integers(0, 100, size=(20_000, 100))].mean(1)
    ref = np.quantile(diffs, [0.025, 0.975])
    assert lo == pytest.approx(ref[0], abs=0.011) and hi == pytest.approx(ref[1], abs=0.011)
    assert all(math.isnan(v) for v in bootstrap_difference(0, 0, 0, 0))


def test_compare_pairs_examples(sweep):
    con = connect([sweep])
    try:
        (row,) = compare(con, T5, T20, resamples=5000, seed=1)
        # A (5 timesteps) broken on ids 0..7, B (20) on 0..3, 10, 11.
        assert (row["n11"], row["n10"], row["n01"], row["n00"]) == (10, 2, 4, 4)
        assert row["n"] == 20 and row["unpaired_a"] == row["unpaired_b"] == 0
        assert row["acc_a"] == 0.6 and row["acc_b"] == 0.7 and row["diff"] == pytest.approx(-0.1)
        assert row["p_value"] == pytest.approx(0.6875) and row["test"] == "mcnemar-exact"
        assert row["diff_lo"] < -0.1 < row["diff_hi"]
        assert compare(con, T5, T20, resamples=5000, seed=1) == [row]  # deterministic
        (vote,) = compare(con, T5, T20, metric="vote")
        assert (vote["acc_a"], vote["acc_b"]) == (0.8, 0.85)
        with pytest.raises(InputError, match="share no"):
            compare(con, "plain-erm", "mi-pl")
        with pytest.raises(InputError, match="'nope' is not in the results"):
            compare(con, T5, "nope")
        with pytest.raises(InputError, match="unknown metric"):
            paired_counts(con, T5, T20, metric="accuracy")
    finally:
        con.close()


def test_compare_refuses_duplicate_rows(sweep):
    import pyarrow as pa

    from pipeline.analytics import load_records

    records = load_records([sweep])
    # The same records twice (two runs of one defense): an example no longer pairs one to one.
    with pytest.raises(InputError, match="has 2 rows for attack"):
        compare(pa.concat_tables([records, records]), T5, T20)
    assert compare(records, T5, T20)[0]["n"] == 20  # a records table works as a source too


# --- RobustBench-style JSON -----------------------------------------------------------------------------------

def test_robustbench_entries(sweep, tmp_path):
    runs = open_runs([sweep])
    con = connect([sweep])
    entries = robustbench_entries(con, plans=[p for _, p in runs], runs=runs)
    con.close()
    key = {(e["name"], e["eps"]): e for e in entries}
    assert sorted(key) == [("mi-pl", "0.5"), ("plain-erm", "4/255"), ("plain-erm", "8/255"),
                           (T20, "8/255"), (T5, "8/255")]
    plain = key[("plain-erm", "8/255")]
    assert (plain["clean_acc"], plain["autoattack_acc"], plain["n_examples"]) == ("95.00", "50.00", 20)
    assert plain["threat_model"] == "Linf" and plain["dataset"] == "digits"
    assert plain["number_forward_passes"] == 1.0  # from the adversarial-images footer
    assert key[(T5, "8/255")]["number_forward_passes"] == 200.0
    assert key[(T20, "8/255")]["number_forward_passes"] is None  # that unit kept no images
    assert key[(T5, "8/255")]["autoattack_acc"] == "60.00" and "R = 3" in key[(T5, "8/255")]["footnote"]
    mi = key[("mi-pl", "0.5")]  # PGD only: no AutoAttack number; the PGD one is `external`
    assert mi["autoattack_acc"] is None and mi["external"] == mi["robust_acc"] == "75.00" and mi["threat_model"] == "L2"
    assert plain["external"] is None and plain["robust_acc"] == "50.00"  # AutoAttack alone: the figure itself

    written = write_robustbench(entries, str(tmp_path / "rb"))
    assert len(written) == 5
    doc = json.loads((tmp_path / "rb" / "digits" / "Linf" / "plain-erm_eps8_255.json").read_text())
    # RobustBench's model_info layout: its keys in its order, percent strings, whole pass counts as ints.
    assert list(doc) == ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                         "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "robustsweep"]
    assert doc["autoattack_acc"] == "50.00" and doc["eps"] == "8/255" and doc["number_forward_passes"] == 1
    assert doc["robustsweep"]["threat_model"] == "Linf" and doc["robustsweep"]["n_examples"] == 20


# --- SQL ------------------------------------------------------------------------------------------------------

QUERY = "SELECT defense, count(*) AS n, sum(adv_correct::INT) AS robust FROM results GROUP BY ALL ORDER BY defense"
EXPECTED = [{"defense": "mi-pl", "n": 20, "robust": 15}, {"defense": "plain-erm", "n": 40, "robust": 26},
            {"defense": T20, "n": 20, "robust": 14}, {"defense": T5, "n": 20, "robust": 12}]


def test_sql_local(sweep):
    table = run_sql([sweep], QUERY)
    assert table.to_pylist() == EXPECTED
    assert arrow_csv(table).splitlines()[:2] == ["defense,n,robust", "mi-pl,20,15"]
    # Hive partitioning is off: `defense` is the record column, not the folder name (which
    # would read "rdc-optimal_timesteps_5_").
    names = run_sql([sweep], "SELECT DISTINCT defense FROM results ORDER BY 1").column("defense").to_pylist()
    assert T5 in names and not any("_timesteps_" in n for n in names)


def test_sql_on_s3(s3_server, s3_bucket):
    uri = write_sweep(f"{s3_bucket}/runs/sweep-0001", storage_options=s3_server.storage_options, images=False)
    assert uri.startswith("s3://")
    table = run_sql([uri], QUERY, storage_options=s3_server.storage_options)
    assert table.to_pylist() == EXPECTED
    result = CliRunner().invoke(app, ["sql", uri, QUERY, "--format", "json", "--endpoint-url", s3_server.endpoint_url])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == EXPECTED
    result = CliRunner().invoke(app, ["report", uri, "--format", "csv", "--endpoint-url", s3_server.endpoint_url])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("defense,attack,path,norm,eps,n,clean_acc")


# --- the commands -----------------------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_report_command(sweep, tmp_path):
    result = invoke("report", sweep, "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("### ") == 7 and "| 50.0 [29.9, 70.1] |" in result.stdout
    result = invoke("report", sweep, "--format", "json", "--section", "stages", "--section", "flags")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"stages", "flags"}
    result = invoke("report", sweep, "--format", "csv", "--section", "classes")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1 + 5 * 10
    result = invoke("report", sweep, "--robustbench", tmp_path / "rb", "--format", "json", "--section", "summary")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "rb").rglob("*.json"))) == 5


@pytest.mark.parametrize("args, message", [
    (["report", "{run}", "--format", "xml"], "--format must be one of table, markdown, csv, json"),
    (["report", "{run}", "--section", "everything"], "unknown section(s) ['everything']"),
    (["report", "{run}", "--format", "csv"], None),  # csv defaults to the summary: fine
    (["report", "{run}", "--format", "csv", "--section", "cost", "--section", "flags"], "writes one table"),
    (["report", "{missing}"], "is not a run folder"),
    (["sql", "{run}", "SELEC defense FROM results"], "bad SQL: Parser Error"),
    (["sql", "{run}", "SELECT nope FROM results"], 'Referenced column "nope" not found'),
    (["sql", "{run}", "SELECT 1", "--format", "xml"], "--format must be one of table, csv, json"),
    (["sql", "SELECT 1"], "give a run folder and a query"),
    (["sql", "{missing}", "SELECT 1"], "is not a run folder"),
    (["compare", "{run}", "--a", T5, "--b", "nope"], "'nope' is not in the results"),
    (["compare", "{run}", "--a", T5, "--b", T20, "--metric", "best"], "unknown metric 'best'"),
])
def test_bad_input_exits_2(sweep, tmp_path, args, message):
    result = invoke(*[a.format(run=sweep, missing=tmp_path / "no-such-run") for a in args])
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_compare_command(sweep):
    result = invoke("compare", sweep, "--a", T5, "--b", T20, "--format", "json", "--resamples", 2000)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["compare"]
    assert row["p_value"] == pytest.approx(0.6875) and row["diff"] == pytest.approx(-0.1)
    result = invoke("compare", sweep, "--a", T5, "--b", T20)
    assert result.exit_code == 0 and "McNemar exact p" in result.stdout and "0.688" in result.stdout


def test_bench_report_small():
    result = invoke("bench", "report", "--rows", 5_000, "--files", 50, "--repeats", 1, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["rows"] == 5_000 and out["files"] == 50
    assert out["report_seconds"] > 0 and out["report_seconds"] == min(out["runs"])
    sections = out["sections"]
    assert (sections["summary"], sections["classes"], sections["stages"], sections["cost"]) == (100, 1000, 100, 100)
