"""Figures (valid PNGs of known pixel size, one per sweep axis or defense), the adversarial
images side file, and the self-contained HTML page opened by headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from analytics_data import IMAGES, N, write_sweep
from PIL import Image
from typer.testing import CliRunner

from pipeline.analytics import connect
from pipeline.analytics.outputs import analyze
from pipeline.analytics.plots import (DPI, EXAMPLE_COLUMN_INCHES, EXAMPLE_COLUMNS, EXAMPLE_ROW_INCHES, FIGSIZE,
                                      choose_examples)
from pipeline.cli import app
from pipeline.store import Store
from pipeline.store.adversarial import adversarial_path, read_adversarial

CHART = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))  # 800 x 500
GRID = (round(EXAMPLE_COLUMNS * EXAMPLE_COLUMN_INCHES * DPI), round(6 * EXAMPLE_ROW_INCHES * DPI))  # 6 examples
EXPECTED = {
    # one per threat model: the headline figure, and each attack and path
    "headline-L2.png": CHART, "headline-Linf.png": CHART,
    "robust_vs_eps-L2.png": CHART, "robust_vs_eps-Linf.png": CHART,
    # one per threat model with an RDC family at two or more timestep counts (5 and 20)
    "robust_vs_timesteps-Linf.png": CHART,
    # one per (threat model, eps)
    "clean_vs_robust-L2-0.5.png": CHART, "clean_vs_robust-Linf-4_255.png": CHART,
    "clean_vs_robust-Linf-8_255.png": CHART,
    # one per defense
    "norms-mi-pl.png": CHART, "norms-plain-erm.png": CHART, "norms-rdc-optimal_timesteps_20_.png": CHART,
    "norms-rdc-optimal_timesteps_5_.png": CHART,
    # one per defense with stored adversarial images
    "examples-plain-erm.png": GRID, "examples-rdc-optimal_timesteps_5_.png": GRID,
}


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk; fails on anything else."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR", "first chunk is not IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def check_png(data: bytes, size: tuple[int, int]) -> np.ndarray:
    assert png_size(data) == size
    image = Image.open(io.BytesIO(data))
    image.verify()  # checksums and structure
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert pixels.shape == (size[1], size[0], 3)
    assert pixels.std() > 10, "a blank image"
    return pixels


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    run = write_sweep(str(root / "sweep-0001"))
    result = analyze([run], plot_dir=root / "plots", html_path=root / "page" / "report.html",
                     robustbench_dir=str(root / "rb"))
    return run, root, result


def test_one_png_per_axis_and_defense(outputs):
    _, root, result = outputs
    assert sorted(Path(p).name for p in result["plots"]) == sorted(EXPECTED)
    assert result["notes"] == []
    for name, size in EXPECTED.items():
        check_png((root / "plots" / name).read_bytes(), size)


def test_example_grid_shows_broken_examples(outputs):
    run, root, _ = outputs
    con = connect([run])
    chosen = choose_examples(con, per_defense=6)
    con.close()
    # Broken ones first (clean right, adversarial wrong) at the largest eps: plain-erm ids 1..6
    # at 8/255 (id 0 was already wrong without attack).
    assert [(e["example_id"], e["eps"]) for e in chosen["plain-erm"]] == [(i, 8 / 255) for i in range(1, 7)]
    assert all(e["clean_correct"] and not e["adv_correct"] for e in chosen["plain-erm"])
    pixels = check_png((root / "plots" / "examples-plain-erm.png").read_bytes(), GRID)
    # The perturbation column is the sign pattern magnified: mostly black and white cells.
    right = pixels[:, 2 * GRID[0] // 3:]
    assert (right < 30).all(axis=2).mean() > 0.1 and (right > 225).all(axis=2).mean() > 0.1


def test_adversarial_side_file_round_trip(outputs):
    run, _, _ = outputs
    store = Store(run)
    rels = store.list("adversarial", ".parquet")
    assert len(rels) == len(IMAGES)
    ids, images, forward = read_adversarial(store, rels[0])
    assert ids.tolist() == list(range(N)) and images.shape == (N, 1, 8, 8) and images.dtype == np.float32
    from pipeline.data import load_split

    x = load_split("digits", "test")[0][:N].numpy()
    delta = np.abs(images - x).max(axis=(1, 2, 3))
    # Exact float32 storage: an 8/255 (or 4/255) step survives to the last bit, nothing beyond it.
    assert np.all(delta <= 8 / 255 + 1e-7) and np.all(delta > 4 / 255 - 1e-7)
    assert forward in IMAGES.values()
    assert adversarial_path("records/defense=a/attack=b/unit-1.parquet") == "adversarial/defense=a/attack=b/unit-1.parquet"


@pytest.mark.slow  # the whole `report --plot --html` path again, every figure rendered a second time
def test_report_command_writes_plots_and_page(outputs, tmp_path):
    run, _, _ = outputs
    result = CliRunner().invoke(app, ["report", run, "--plot", str(tmp_path / "p"), "--html",
                                      str(tmp_path / "r.html"), "--format", "json", "--section", "summary"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == sorted(EXPECTED)
    assert (tmp_path / "r.html").stat().st_size > 10_000


class _Page(HTMLParser):
    """Collects tables (section names), images (src) and any reference to another resource."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("data-section"))
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_html_page_is_self_contained(outputs):
    _, root, _ = outputs
    page = parse((root / "page" / "report.html").read_text(encoding="utf-8"))
    assert page.tables == ["headline", "summary", "classes", "stages", "cost", "prediction", "flags", "robustbench"]
    assert page.external == []
    assert len(page.images) == len(EXPECTED)
    sizes = sorted(png_size(base64.b64decode(src.split(",", 1)[1])) for src in page.images)
    assert sizes == sorted(EXPECTED.values())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    # No network, no first-run work, a throwaway profile; --no-sandbox because tests may run as root.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make setup-browser installs it)")
def test_html_page_in_headless_chromium(outputs, tmp_path):
    _, root, _ = outputs
    url = (root / "page" / "report.html").resolve().as_uri()
    assert url.startswith("file://")
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)  # the document as the browser built it
    assert page.tables == ["headline", "summary", "classes", "stages", "cost", "prediction", "flags", "robustbench"]
    assert len(page.images) == len(EXPECTED) and all(s.startswith("data:image/png;base64,") for s in page.images)
    assert "rdc-optimal[timesteps=20]" in dom.stdout and "70.0 [48.1, 85.5]" in dom.stdout

    shot = tmp_path / "report.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1400,9000", url, profile=tmp_path / "profile-shot")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = check_png(shot.read_bytes(), (1400, 9000))
    # The figures were decoded and drawn: matplotlib's first line colour (31, 119, 180) only
    # occurs in them, never in the tables.
    blue = (np.abs(pixels.astype(int) - [31, 119, 180]).sum(axis=2) < 30).sum()
    assert blue > 2000
    # The tables were laid out: dark text near the top of the page.
    assert (pixels[:600].mean(axis=2) < 80).sum() > 2000


def test_worker_keeps_adversarial_images(tmp_path):
    """A unit run by the worker (no Ray needed) leaves its adversarial images beside its records,
    exactly as scored, and the analytics use them: the image grid and the forward passes."""
    from pipeline.runtime.plan import plan, plan_document, run_id_for
    from pipeline.config.job import load_job
    from pipeline.runtime.worker import Worker, WorkerContext

    spec = tmp_path / "tiny.toml"
    spec.write_text('name = "tiny"\n[data]\ndataset = "digits"\nlimit = 2\nshard_size = 2\n'
                    '[[defenses]]\nkind = "rdc"\nmodel = "optimal"\ntimesteps = 4\n'
                    '[[attacks]]\nkind = "pgd"\nsteps = 2\neot = 2\neps = 0.1\npasses = 2\n')
    job = load_job(spec)
    (unit,) = plan(job, 355)
    run_id, out = run_id_for(job), str(tmp_path / "out")
    Store(out).write_json(f"{run_id}/plan.json", plan_document(job, [unit], run_id))
    Worker("w0", "cpu").run_unit(unit, WorkerContext(run_id, job.hash, out, 0, job.spec.data))
    run = Store(out).join(run_id)
    store = Store(run)
    ids, images, forward = read_adversarial(store, adversarial_path(unit.path))
    records = store.read_records()
    from pipeline.data import load_split

    x = load_split("digits", "test")[0][:2].numpy()
    linf = np.abs(images - x).reshape(2, -1).max(1)
    assert ids.tolist() == [0, 1] and linf.tolist() == pytest.approx(records.column("linf").to_pylist(), abs=1e-6)
    # One prediction of RDC on the optimal model: 4 timesteps, all classes from one call each.
    assert forward == 4.0
    result = analyze([run], plot_dir=tmp_path / "plots", robustbench_dir=str(tmp_path / "rb"))
    assert "examples-rdc-optimal.png" in [Path(p).name for p in result["plots"]]
    entry = json.loads(next((tmp_path / "rb").rglob("*.json")).read_text())
    assert entry["number_forward_passes"] == 4 and entry["robustsweep"]["n_examples"] == 2
