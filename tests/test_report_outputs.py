"""Stage rows, figures, the HTML page and the CLI's bad-input errors of the report.

The sweep's runs are written with the project's own ``Tracker`` (trial runs, nested stage runs
with their tags and per-epoch history) into a real sqlite MLflow store, as a sweep would write
them; the expected numbers are the values logged here, run through ``ray_lt.stats``.
"""

from __future__ import annotations

import base64
import io
import math
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_lt.errors import RayLtError
from ray_lt.report import main
from ray_lt.report_figures import bin_by_count, pareto_front, plot_per_class
from ray_lt.report_model import Report, make_row
from ray_lt.report_stages import learning_curves, search_stage_runs
from ray_lt.reporting import build_report
from ray_lt.stats import compare, mean_ci
from ray_lt.tracking import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = ("0", "1", "2")
# trial final (cRT) test metrics per config and seed: lr=0.05 best overall, lr=0.1 best few,
# lr=0.2 dominated by lr=0.1 on both
FINAL = {
    "0.05": {"0": (0.60, 0.20), "1": (0.62, 0.22), "2": (0.61, 0.19)},
    "0.1": {"0": (0.55, 0.40), "1": (0.57, 0.42), "2": (0.56, 0.41)},
    "0.2": {"0": (0.50, 0.30), "1": (0.52, 0.31), "2": (0.49, 0.33)},
}
# the CE stage's final test (overall, few) per seed, shared by every config of a seed
CE = {"0": (0.45, 0.05), "1": (0.47, 0.06), "2": (0.44, 0.04)}
# the last epoch's history value of CE: what MLflow calls the "latest" overall, which is not
# the exported model's (a stage that keeps its best epoch), so a report reading it is wrong
CE_LAST_EPOCH = 0.11


def _metrics(overall: float, few: float) -> dict[str, float]:
    return {"overall": overall, "few": few, "many": overall + 0.1, "medium": overall - 0.05}


def _spec(kind: str, name: str, seed: str, **params) -> dict:
    train = {"seed": int(seed), "epochs": 4, "eval_every": 2, "lr": 0.05}
    return {
        "spec": {
            "kind": kind,
            "name": name,
            "data": {"name": "toy"},
            "train": train,
            "params": params,
        }
    }


def _history(last: float) -> list[dict]:
    """Epochs 1-4, evaluated at 2 and 4 (eval_every=2); epochs 1 and 3 repeat stale values."""
    vals = {1: 0.9, 2: last - 0.2, 3: 0.9, 4: last}  # 0.9: a stale value that must not show
    return [{"epoch": e, "val_overall": v, "overall": v, "loss": 1.0 / e} for e, v in vals.items()]


def _stage(tracker, parent, doc, key, test, *, reused, final, history_last=None):
    metrics = {"test": test, "val": {"overall": test["overall"]}}
    if history_last is not None:
        metrics["history"] = _history(history_last)
    tracker.log_stage(parent, doc, metrics, key=key, reused=reused, final=final, artifact_dir=None)
    time.sleep(0.003)  # distinct start times: the DAG order is read from them


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Experiment 'staged': ce(seed) -> logits(config, seed) -> crt(config, seed), 3 x 3 trials,
    plus a FAILED earlier try of (lr=0.1, seed 2) whose crt the finished try reused."""
    root = tmp_path_factory.mktemp("staged")
    uri = f"sqlite:///{root}/mlflow.db"
    Tracker(uri, "setup").client.create_experiment(
        "staged",
        artifact_location=str(root / "artifacts"),  # else MLflow writes to ./mlruns
    )
    tracker = Tracker(uri, "staged")
    trained_ce: set[str] = set()
    for lr, by_seed in FINAL.items():
        for seed, (overall, few) in by_seed.items():
            config = {"lr": float(lr), "seed": int(seed)}
            crt_key = f"crt-{lr}-{seed}"
            retried = (lr, seed) == ("0.1", "2")
            if retried:  # the first try trained crt, then died before finishing
                failed = tracker.start_trial(f"t{lr}_{seed}_a", config, False)
                _stage(
                    tracker,
                    failed,
                    _spec("crt", "crt", seed),
                    crt_key,
                    _metrics(overall, few),
                    reused=False,
                    final=True,
                    history_last=overall,
                )
                tracker.fail_trial(failed, "killed")
            run = tracker.start_trial(f"t{lr}_{seed}", config, False)
            ce_doc = _spec("ce", "ce", seed, backbone="resnet8")
            first = seed not in trained_ce
            trained_ce.add(seed)
            _stage(
                tracker,
                run,
                ce_doc,
                f"ce-{seed}",
                _metrics(*CE[seed]),
                reused=not first,
                final=False,
                history_last=CE_LAST_EPOCH if first else None,
            )
            _stage(
                tracker,
                run,
                _spec("cbe_logits", "logits", seed),
                f"logits-{lr}-{seed}",
                _metrics(overall - 0.01, few),
                reused=False,
                final=False,
                history_last=CE_LAST_EPOCH,  # only a trained run of this key: read at step 0
            )
            _stage(
                tracker,
                run,
                _spec("crt", "crt", seed),
                crt_key,
                _metrics(overall, few),
                reused=retried,
                final=True,
                history_last=None if retried else overall,
            )
            tracker.finish_trial(run, _metrics(overall, few), None)
    return {"uri": uri, "root": root}


@pytest.fixture(scope="module")
def staged(sweep, tmp_path_factory) -> Report:
    out = tmp_path_factory.mktemp("staged_report")
    return build_report(
        sweep["uri"],
        "staged",
        out,
        metrics=("few", "overall"),
        stages=True,
        baseline={"lr": "0.05"},
    )


def _values(table: dict, metric: str) -> list[float]:
    i = ("overall", "few").index(metric)
    return [table[s][i] for s in SEEDS]


def test_stage_rows_have_the_config_statistics(staged):
    assert [r.label for r in staged.stage_rows] == [
        "ce",
        "logits (for lr=0.05)",
        "logits (for lr=0.1)",
        "logits (for lr=0.2)",
    ]
    ce = staged.stage_rows[0]
    assert ce.stage == "ce" and ce.seeds == list(SEEDS)  # shared by 3 configs: once per seed
    base = next(r for r in staged.rows if r.baseline)
    for m in ("overall", "few"):
        want = _values(CE, m)
        assert ce.values[m] == pytest.approx(want)  # step 0, not the last epoch's 0.11
        n, mean, _, lo, hi = mean_ci(want)
        assert (ce.n[m], ce.mean[m], ce.ci_lo[m], ce.ci_hi[m]) == pytest.approx((n, mean, lo, hi))
        got, exp = ce.comparison[m], compare(want, base.values[m], list(SEEDS), base.seeds)
        assert (got.test, got.p, got.delta) == pytest.approx((exp.test, exp.p, exp.delta))
        assert got.test == "paired"
    logits = staged.stage_rows[1]
    assert logits.values["overall"] == pytest.approx(
        [v - 0.01 for v in _values(FINAL["0.05"], "overall")]
    )
    assert all(not r.baseline for r in staged.stage_rows)
    assert set(staged.best.values()) <= {r.config_id for r in staged.rows}  # stages never bold


def test_stage_rows_in_every_table(staged):
    md = staged.markdown
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]
    assert [ln.split(" | ")[0][2:] for ln in lines] == [
        "ce (stage)",
        "logits (for lr=0.05) (stage)",
        "logits (for lr=0.1) (stage)",
        "logits (for lr=0.2) (stage)",
        "lr=0.05 (baseline)",
        "lr=0.1",
        "lr=0.2",
    ]
    ce_overall = mean_ci(_values(CE, "overall"))
    assert "| ce (stage) | 3 | " in md and f"{100 * ce_overall[1]:.1f} ± " in lines[0]
    assert "Rows marked (stage): upstream stages" in md
    tex = staged.files["tex"].read_text(encoding="utf-8")
    assert "ce (stage) & 3 & " in tex
    csv_lines = staged.files["csv"].read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].endswith(",stage") and csv_lines[1].startswith("ce,stage:ce:")
    assert csv_lines[1].endswith(",ce") and csv_lines[-1].endswith(",")


def test_learning_curves_come_from_the_stage_that_trained(sweep, staged):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sweep["uri"])
    runs = search_stage_runs(client, client.get_experiment_by_name("staged").experiment_id)
    metric, curves = learning_curves(client, runs, staged.rows)
    assert metric == "val_overall"
    for row in staged.rows:
        lr = row.label.split("=")[1].split(" ")[0]
        finals = _values(FINAL[lr], "overall")
        # epochs 2 and 4 only (eval_every=2); (0.1, seed 2) from the failed try's stage run
        assert sorted(curves[row.config_id]) == [2, 4]
        assert curves[row.config_id][4] == pytest.approx(finals)
        assert curves[row.config_id][2] == pytest.approx([v - 0.2 for v in finals])


def _png_ok(data: bytes) -> None:
    assert data[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(data)) as img:
        img.verify()


def test_figures_exist_and_are_png(staged):
    for name in ("pareto", "shot_groups", "learning_curves"):
        path = staged.files[name]
        assert path.name == f"{name}.png" and path.parent == staged.files["md"].parent
        _png_ok(path.read_bytes())
    assert "per_class" not in staged.files  # these trials logged no per_class.parquet


def test_pareto_front_highlights_the_non_dominated(staged):
    front, dominated = pareto_front(staged.rows, ("overall", "few"), ("max", "max"))
    assert [r.label for r in front] == ["lr=0.05", "lr=0.1"]
    assert [r.label for r in dominated] == ["lr=0.2"]
    front, _ = pareto_front(staged.rows, ("overall", "few"), ("min", "max"))
    assert [r.label for r in front] == ["lr=0.1", "lr=0.2"]


class _Page(HTMLParser):
    """Table rows (cell texts), image sources and every href/src of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("href", "src") if k in attrs]
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _md_rows(md: str) -> list[list[str]]:
    """The Markdown table's rows as plain cell texts (bold and escapes removed)."""
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("|---")]
    out = []
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split(" | ")]
        out.append([c.replace("**", "").replace("\\*", "*") for c in cells])
    return out


def test_html_page_is_self_contained(staged):
    page = staged.files["html"]
    assert page.name == "index.html"
    text = page.read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(text)
    parser.close()
    md_rows = _md_rows(staged.markdown)
    assert len(md_rows) == 1 + len(staged.all_rows)
    assert parser.rows == md_rows  # every row and cell of table.md, in order
    figures = {"pareto", "shot_groups", "learning_curves"}
    assert len(parser.images) == len(figures)
    for src in parser.images:
        head, _, payload = src.partition(",")
        assert head == "data:image/png;base64"
        _png_ok(base64.b64decode(payload, validate=True))
    embedded = {base64.b64decode(s.partition(",")[2]) for s in parser.images}
    assert embedded == {staged.files[f].read_bytes() for f in figures}
    assert all(link.startswith("data:") for link in parser.links)  # nothing fetched
    assert "Tests vs the baseline" in text


def test_bins_of_a_1000_class_case():
    counts = np.arange(1, 1001)  # 1, 2, ..., 1000
    acc = counts / 1000.0
    bins = bin_by_count(counts, acc, n_bins=3)  # edges 1, 10, 100, 1000 (last one included)
    assert [(b.lo, b.hi) for b in bins] == [
        pytest.approx(e) for e in ((1, 10), (10, 100), (100, 1000))
    ]
    assert [b.classes for b in bins] == [9, 90, 901]
    assert [b.mean for b in bins] == pytest.approx([5 / 1000, 54.5 / 1000, 550 / 1000])
    # population std of n consecutive integers: sqrt((n^2 - 1) / 12)
    stds = [math.sqrt((n * n - 1) / 12) / 1000 for n in (9, 90, 901)]
    assert [b.std for b in bins] == pytest.approx(stds)
    assert bins[0].center == pytest.approx(
        math.exp(math.fsum(math.log(c) for c in range(1, 10)) / 9)
    )
    # a CIFAR-style profile at 1,000 classes (1000 down to 10 images), one class without test
    profile = np.floor(1000 * 0.01 ** (np.arange(1000) / 999)).astype(int)
    acc = np.linspace(0.9, 0.1, 1000)
    acc[500] = math.nan
    bins = bin_by_count(profile, acc)
    assert len(bins) == 12 and sum(b.classes for b in bins) == 999
    assert bins[0].lo == pytest.approx(10) and bins[-1].hi == pytest.approx(1000)
    assert all(a.mean < b.mean for a, b in zip(bins, bins[1:], strict=False))
    assert [b.classes for b in bin_by_count([5, 5, 50, 500], [0.1, 0.3, 0.5, 1.0])] == [2, 1, 1]
    single = bin_by_count([7, 7, 7], [0.2, 0.4, math.nan])
    assert len(single) == 1 and single[0].classes == 2 and single[0].mean == pytest.approx(0.3)


def test_per_class_plot_at_1000_classes(tmp_path):
    profile = np.floor(1000 * 0.01 ** (np.arange(1000) / 999))
    rng = np.random.default_rng(0)
    rows, curves = [], {}
    for i in range(3):
        row = make_row(f"cfg{i}", f"method={i}", {}, ["0"], {"overall": [0.5]}, ["r"])
        rows.append(row)
        curves[row.config_id] = (profile, rng.uniform(0, 1, 1000))
    report = Report("big", rows, {}, 0, {}, "", ["overall"], title="big")
    _png_ok(plot_per_class(report, curves, tmp_path / "pc.png").read_bytes())


def _experiment_file(tmp_path: Path, name: str, **fields: str) -> str:
    extra = "".join(f", {k}={v}" for k, v in fields.items())
    file = tmp_path / f"{name.replace('-', '_')}.py"
    file.write_text(
        "from ray_lt.experiment import Experiment\n\n"
        f"experiment = Experiment(name={name!r}, pipeline=lambda config: None{extra})\n",
        encoding="utf-8",
    )
    return str(file)


def test_cli_writes_the_page_and_the_stage_rows(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    file = _experiment_file(tmp_path, "staged")
    assert main([file, "--tracking-uri", sweep["uri"], "--out", str(out), "--stages"]) == 0
    stdout = capsys.readouterr().out
    assert "| ce (stage) | 3 |" in stdout and f"wrote html: {out / 'index.html'}" in stdout
    assert {p.name for p in out.iterdir()} == {
        "table.md",
        "table.tex",
        "table.csv",
        "index.html",
        "pareto.png",
        "shot_groups.png",
        "learning_curves.png",
    }


def test_cli_reads_one_sweep_and_logs_the_report_on_its_run(tmp_path, capsys):
    """Trial runs nest under their sweep's run: the report reads the newest sweep (or the one
    named, or every trial run), and its files land on that sweep run under ``report/``."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "setup").client.create_experiment("sw", artifact_location=str(tmp_path / "a"))
    tracker = Tracker(uri, "sw")
    legacy = tracker.start_trial("t0", {"lr": 0.3, "seed": 0}, False)  # from before sweep runs
    tracker.finish_trial(legacy, _metrics(0.3, 0.1), None)
    sweeps = []
    for lr in (0.1, 0.2):
        sweeps.append(tracker.start_sweep("sw.py", False, {"file": "sw.py"}))
        run = tracker.start_trial(f"t{lr}", {"lr": lr, "seed": 0}, False, sweeps[-1])
        tracker.finish_trial(run, _metrics(lr, 0.1), None)
        tracker.finish_sweep(sweeps[-1])
        time.sleep(0.01)  # distinct start times: the newest sweep is the default
    file = _experiment_file(tmp_path, "sw")
    args = [file, "--tracking-uri", uri, "--metrics", "overall"]

    def report(*extra: str) -> str:
        assert main([*args, "--out", str(tmp_path / "out"), *extra]) == 0
        return capsys.readouterr().out

    newest = report()
    assert "lr=0.2" in newest and "lr=0.1" not in newest and "lr=0.3" not in newest
    assert "MLflow: sweep run 'sw · " in newest and f"({sweeps[1]})" in newest
    client = MlflowClient(uri)
    names = {Path(a.path).name for a in client.list_artifacts(sweeps[1], "report")}
    assert {"index.html", "table.md", "table.csv", "shot_groups.png"} <= names
    assert client.get_run(sweeps[1]).data.metrics["trials_finished"] == 1
    older = report("--sweep", sweeps[0])
    assert "lr=0.1" in older and "lr=0.2" not in older and f"({sweeps[0]})" in older
    every = report("--all-sweeps")
    assert all(f"lr={lr}" in every for lr in (0.1, 0.2, 0.3)) and "not copied" in every
    assert main([*args, "--sweep", legacy]) == 2  # a trial run is no sweep run
    err = capsys.readouterr().err
    assert err.startswith(f"error: --sweep {legacy} is not a sweep run of 'sw' in {uri} ")
    assert f"newest first: {sweeps[1]} (sw · " in err and err.count("\n") == 1


def _bad_cases(sweep_uri: str, old_uri: str) -> dict:
    """name -> (experiment name, Experiment fields, extra argv, tracking uri, stderr start)."""
    two = {"metric": "('val_overall', 'val_few')", "mode": "('max', 'max')"}
    return {
        "baseline names no row": (
            "staged",
            {},
            ["--baseline", "lr=9"],
            sweep_uri,
            "error: baseline lr=9 matches no row of 'staged'; ",
        ),
        "stages on runs that predate stage tags": (
            "old",
            {},
            ["--stages"],
            old_uri,
            "error: --stages: the stage runs of the reported trials of 'old' (1) predate the "
            "stage tags (ray_lt.stage_key, ray_lt.stage_kind); re-run the sweep",
        ),
        "pareto objective never logged": (
            "old",
            two,
            [],
            old_uri,
            "error: the Pareto front overall vs few of 'old' has no values for 'few' ",
        ),
        "a front of one metric": (
            "staged",
            {},
            ["--front", "overall"],
            sweep_uri,
            "error: --front 'overall' names 1 metrics; a Pareto front "
            "needs two, e.g. --front overall,few",
        ),
        "a sweep run the experiment does not have": (
            "staged",
            {},
            ["--sweep", "0123abcd"],
            sweep_uri,
            "error: --sweep 0123abcd is not a sweep run of 'staged' in sqlite:///",
        ),
        "experiment that never ran": (
            "never",
            {},
            [],
            sweep_uri,
            "error: experiment 'never' not found in sqlite:///",
        ),
    }


@pytest.fixture(scope="module")
def old_sweep(tmp_path_factory):
    """Experiment 'old': one trial with a stage run from before the stage tags, no 'few'."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    root = tmp_path_factory.mktemp("old")
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker(uri, "old")
    run = tracker.start_trial("t0", {"lr": 0.1, "seed": 0}, False)
    client = MlflowClient(tracking_uri=uri)
    stage = client.create_run(
        tracker.experiment_id, tags={"ray_lt.role": "stage", "mlflow.parentRunId": run}
    )
    client.log_batch(stage.info.run_id, metrics=[Metric("overall", 0.5, 0, 0)])
    client.set_terminated(stage.info.run_id, "FINISHED")
    tracker.finish_trial(run, {"overall": 0.5, "many": 0.6, "medium": 0.4}, None)
    return uri


@pytest.mark.parametrize(
    "case",
    [
        "baseline names no row",
        "stages on runs that predate stage tags",
        "pareto objective never logged",
        "a front of one metric",
        "a sweep run the experiment does not have",
        "experiment that never ran",
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(case, sweep, old_sweep, tmp_path, capsys):
    name, fields, extra, uri, start = _bad_cases(sweep["uri"], old_sweep)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.md").write_text("an earlier report\n", encoding="utf-8")
    (out / "index.html").write_text("<p>earlier</p>\n", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    file = _experiment_file(tmp_path, name, **fields)
    assert main([file, "--tracking-uri", uri, "--out", str(out), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(start), captured.err
    assert captured.err.count("\n") == 1 and "; " in captured.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_stages_error_without_the_cli(old_sweep, tmp_path):
    with pytest.raises(
        RayLtError,
        match=r"^--stages: the stage runs of the reported trials of 'old' \(1\) predate the stage",
    ):
        build_report(old_sweep, "old", tmp_path / "x", stages=True)
    assert not (tmp_path / "x").exists()
    # without --stages the same runs make a report: no front (no 'few'), no learning curves
    rep = build_report(old_sweep, "old", tmp_path / "y", metrics=("overall",))
    assert "pareto" not in rep.files and "learning_curves" not in rep.files
    assert "shot_groups" in rep.files and rep.files["html"].is_file()


def test_front_names_the_configurations_it_cannot_place(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "partial")
    for lr, few in (("0.1", 0.3), ("0.2", None)):
        for seed in (0, 1):
            run = tracker.start_trial(f"{lr}_{seed}", {"lr": float(lr), "seed": seed}, False)
            metrics = {"overall": 0.5 + seed / 100, **({} if few is None else {"few": few})}
            tracker.finish_trial(run, metrics, None)
    rep = build_report(uri, "partial", tmp_path / "out", metrics=("overall",))
    assert "pareto" in rep.files
    assert rep.figure_notes["pareto"].endswith("Not drawn, no overall or few value: lr=0.2.")
    page = rep.files["html"].read_text(encoding="utf-8")
    assert "Not drawn, no overall or few value: lr=0.2.</figcaption>" in page
