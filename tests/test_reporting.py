"""Tests for ray_lt.reporting against a real sqlite MLflow store laid out as the sweep writes it.

The expected numbers are computed here with numpy from the values the fixture logged, never from
the module under test.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ray_lt.errors import ConfigError, CorruptArtifactError, RayLtError
from ray_lt.metrics import GROUP_NAMES, shot_groups
from ray_lt.report_tables import format_cell, latex_escape
from ray_lt.reporting import (
    Report,
    _group_of_logged,
    _load_per_class,
    _nan_stats,
    build_report,
)
from ray_lt.stats import compare, mean_ci, significance_mark

METRICS = ("many", "medium", "few", "overall")
COUNTS = np.array([500, 300, 150, 101, 100, 60, 20, 19, 8, 5])
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# config_id -> (params without seed, seeds, metrics whose value is NaN for the given seeds)
CONFIGS = {
    "cfg_a": ({"lr": "0.05", "wd": "0.0005", "epochs": "2"}, ["0", "1", "2"], {}),
    "cfg_b": ({"lr": "0.1", "wd": "0.0005", "epochs": "2"}, ["0", "1", "2"], {"few": "012"}),
    "cfg_c": ({"lr": "0.2", "wd": "0.0005", "epochs": "2"}, ["0", "1"], {"few": "0"}),
}


def _per_class_file(path: Path, rng: np.random.Generator) -> dict[int, float]:
    acc = rng.uniform(0.0, 1.0, size=len(COUNTS))
    acc[3] = math.nan  # a class with no test sample
    groups = [GROUP_NAMES[g] for g in shot_groups(COUNTS)]
    table = pa.table(
        {
            "class": pa.array(range(len(COUNTS)), pa.int64()),
            "train_count": pa.array(COUNTS, pa.int64()),
            "group": pa.array(groups, pa.string()),
            "accuracy": pa.array(acc, pa.float64()),
        }
    )
    pq.write_table(table, path)
    return dict(enumerate(acc.tolist()))


def _trial(
    client, exp_id, cid, params, seed, values, *, status="FINISHED", smoke="false", per_class=None
):
    from mlflow.entities import Metric, Param

    tags = {
        "ray_lt.role": "trial",
        "ray_lt.trial_id": f"{cid}_{seed}",
        "ray_lt.config_id": cid,
        "ray_lt.label": f"tag label {cid}",
        "ray_lt.smoke": smoke,
    }
    run = client.create_run(exp_id, tags=tags)
    rid = run.info.run_id
    flat = {**{f"optim/{k}": v for k, v in params.items()}, "seed": seed}
    client.log_batch(
        rid,
        metrics=[Metric(k, v, 0, 0) for k, v in values.items()],
        params=[Param(k, v) for k, v in flat.items()],
    )
    if per_class is not None:
        client.log_artifact(rid, str(per_class))
    stage = client.create_run(
        exp_id, tags={"ray_lt.role": "stage", "mlflow.parentRunId": rid, "ray_lt.config_id": cid}
    )
    client.log_batch(stage.info.run_id, metrics=[Metric(k, 0.999, 0, 0) for k in METRICS])
    client.set_terminated(stage.info.run_id, "FINISHED")
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store: quickstart (3 configs, a FAILED, a RUNNING, a smoke run), other, empty."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlstore")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("quickstart", artifact_location=str(root / "artifacts"))
    rng = np.random.default_rng(0)
    logged: dict[str, dict[str, list[float]]] = {}
    per_class: dict[str, list[dict[int, float]]] = {}
    for cid, (params, seeds, nan) in CONFIGS.items():
        logged[cid] = {m: [] for m in METRICS}
        per_class[cid] = []
        for seed in seeds:
            values = {m: float(rng.uniform(0.2, 0.8)) for m in METRICS}
            for m, nan_seeds in nan.items():
                if seed in nan_seeds:
                    values[m] = math.nan
            for m in METRICS:
                logged[cid][m].append(values[m])
            pc = root / f"pc_{cid}_{seed}" / "per_class.parquet"
            pc.parent.mkdir()
            per_class[cid].append(_per_class_file(pc, rng))
            _trial(client, exp, cid, params, seed, values, per_class=pc)
    best_vals = {m: 0.995 for m in METRICS}
    _trial(client, exp, "cfg_a", CONFIGS["cfg_a"][0], "3", best_vals, status="FAILED")
    _trial(client, exp, "cfg_b", CONFIGS["cfg_b"][0], "3", best_vals, status="RUNNING")
    smoke_params = {"lr": "0.05", "wd": "0.0005", "epochs": "1"}
    _trial(client, exp, "cfg_s", smoke_params, "0", best_vals, smoke="true")
    other = client.create_experiment("other", artifact_location=str(root / "artifacts_o"))
    _trial(client, other, "cfg_a", CONFIGS["cfg_a"][0], "9", best_vals)
    client.create_experiment("empty", artifact_location=str(root / "artifacts_e"))
    nofew = client.create_experiment("nofew", artifact_location=str(root / "artifacts_n"))
    no_few_vals = {m: 0.5 for m in ("many", "medium", "overall")}  # NaN metrics are not logged
    _trial(client, nofew, "cfg_n", CONFIGS["cfg_a"][0], "0", no_few_vals)
    bad = client.create_experiment("corrupt", artifact_location=str(root / "artifacts_c"))
    junk = root / "junk" / "per_class.parquet"
    junk.parent.mkdir()
    junk.write_bytes(b"this is not parquet")
    _trial(client, bad, "cfg_x", CONFIGS["cfg_a"][0], "0", best_vals, per_class=junk)
    return {"uri": uri, "root": root, "logged": logged, "per_class": per_class}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Report:
    out = tmp_path_factory.mktemp("report")
    return build_report(store["uri"], "quickstart", out, smoke=False, title="quick_start 100%")


def _expected(values: list[float]) -> tuple[float, float]:
    arr = np.array(values)
    finite = arr[~np.isnan(arr)]
    if finite.size == 0:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if finite.size > 1 else 0.0


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-15)


def _expected_best(logged) -> dict[str, str]:
    best = {}
    for m in METRICS:
        means = {cid: _expected(v[m])[0] for cid, v in logged.items()}
        means = {cid: x for cid, x in means.items() if not math.isnan(x)}
        best[m] = max(means, key=means.get)
    return best


def test_rows_match_logged_metrics(report, store):
    logged = store["logged"]
    assert [r.config_id for r in report.rows] == ["cfg_a", "cfg_b", "cfg_c"]
    assert [r.label for r in report.rows] == ["lr=0.05", "lr=0.1", "lr=0.2"]
    for row in report.rows:
        assert row.seeds == CONFIGS[row.config_id][1]
        assert row.params == {f"optim/{k}": v for k, v in CONFIGS[row.config_id][0].items()}
        for m in METRICS:
            assert all(
                _same(a, b) for a, b in zip(row.values[m], logged[row.config_id][m], strict=True)
            )
            mean, std = _expected(logged[row.config_id][m])
            assert _same(row.mean[m], mean) and _same(row.std[m], std), (row.config_id, m)
    b = report.rows[1]
    assert math.isnan(b.mean["few"]) and math.isnan(b.std["few"])
    c = report.rows[2]
    assert c.mean["few"] == logged["cfg_c"]["few"][1] and c.std["few"] == 0.0
    assert report.skipped_runs == 2 and report.skipped_by_status == {"FAILED": 1, "RUNNING": 1}
    assert report.best == _expected_best(logged)


def test_markdown_cells_bold_and_footnotes(report, store):
    md = report.files["md"].read_text(encoding="utf-8")
    assert md == report.markdown
    assert md.splitlines()[0] == "# quick_start 100%"
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| lr=")}
    assert set(lines) == {"lr=0.05", "lr=0.1", "lr=0.2"}
    assert "| configuration | n | many | medium | few | overall |" in md
    for row in report.rows:
        n_seeds, *cells = [c.strip() for c in lines[row.label].split("|")[2:-1]]
        assert n_seeds == str(len(CONFIGS[row.config_id][1]))
        for m, cell in zip(METRICS, cells, strict=True):
            mean, std = _expected(store["logged"][row.config_id][m])
            text = "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"
            if report.best[m] == row.config_id:
                text = f"**{text}**"
            _, _, _, lo, hi = mean_ci(store["logged"][row.config_id][m])
            if not math.isnan(lo):  # no baseline: no mark; n < 2: no interval
                text += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
            assert cell == text, (row.label, m)
    assert "seeds per row: lr=0.05: 3, lr=0.1: 3, lr=0.2: 2." in md
    assert "Skipped 2 unfinished trial runs (FAILED: 1, RUNNING: 1)." in md
    assert md.count("**") == 2 * len(METRICS)


def test_latex_is_booktabs_and_escaped(report):
    tex = report.files["tex"].read_text(encoding="utf-8")
    for token in ("\\begin{tabular}{lrcccc}", "\\toprule", "\\midrule", "\\bottomrule"):
        assert token in tex
    assert "quick\\_start 100\\%" in tex
    assert tex.count("\\textbf{") == len(METRICS)
    assert "lr=0.1 & " in tex and " -- " in tex
    assert latex_escape("a_b 5% & $x# {y} ~^\\") == (
        "a\\_b 5\\% \\& \\$x\\# \\{y\\} \\textasciitilde{}\\textasciicircum{}\\textbackslash{}"
    )


def test_csv_round_trips(report, store):
    path = report.files["csv"]
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["config_id"] for r in rows] == ["cfg_a", "cfg_b", "cfg_c"]
    for r in rows:
        assert int(r["n_seeds"]) == len(CONFIGS[r["config_id"]][1])
        assert r["param:optim/lr"] == CONFIGS[r["config_id"]][0]["lr"]
        for m in METRICS:
            mean, std = _expected(store["logged"][r["config_id"]][m])
            got_mean = float(r[f"{m}_mean"]) if r[f"{m}_mean"] else math.nan
            got_std = float(r[f"{m}_std"]) if r[f"{m}_std"] else math.nan
            assert _same(got_mean, mean) and _same(got_std, std)
            assert (r[f"best_{m}"] == "true") == (report.best[m] == r["config_id"])
    table = pacsv.read_csv(path)
    assert table.column("best_overall").type == pa.bool_()
    assert table.column("few_mean").null_count == 1
    assert table.column("overall_mean").to_pylist() == [r.mean["overall"] for r in report.rows]


def test_per_class_png_and_curves(report, store):
    png = report.files["per_class"]
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    from mlflow import MlflowClient

    curves, missing = _load_per_class(MlflowClient(tracking_uri=store["uri"]), report.rows)
    assert missing == 0 and report.missing_per_class == 0
    for row in report.rows:
        counts, acc = curves[row.config_id]
        assert counts.tolist() == COUNTS.tolist()
        seeds = store["per_class"][row.config_id]
        for c in range(len(COUNTS)):
            expect = _expected([s[c] for s in seeds])[0]
            assert _same(float(acc[c]), expect)
        assert math.isnan(acc[3])


def test_smoke_filter_and_label_fallback(store, tmp_path):
    rep = build_report(store["uri"], "quickstart", tmp_path, smoke=True, metrics=("overall",))
    assert [r.config_id for r in rep.rows] == ["cfg_s"]
    assert rep.rows[0].label == "tag label cfg_s"  # nothing varies: the tag label is used
    assert rep.skipped_runs == 0 and "per_class" not in rep.files  # the smoke run has no per_class
    assert rep.missing_per_class == 1
    assert "1 seed per row." in rep.markdown
    both = build_report(store["uri"], "quickstart", tmp_path / "both", smoke=None, mode="min")
    assert sorted(r.label for r in both.rows) == sorted(
        ["epochs=1 lr=0.05", "epochs=2 lr=0.05", "epochs=2 lr=0.1", "epochs=2 lr=0.2"]
    )
    means = {r.config_id: r.mean["overall"] for r in both.rows}
    assert both.best["overall"] == min(means, key=means.get)


def test_other_experiment_not_mixed_in(store, tmp_path):
    rep = build_report(store["uri"], "other", tmp_path)
    assert len(rep.rows) == 1 and rep.rows[0].seeds == ["9"]
    assert rep.rows[0].mean["overall"] == 0.995


def test_group_never_logged_is_a_dash_column(store, tmp_path):
    rep = build_report(store["uri"], "nofew", tmp_path)
    assert math.isnan(rep.rows[0].mean["few"]) and "few" not in rep.best
    assert "| **50.0 ± 0.0** | – | **50.0 ± 0.0** |" in rep.markdown


def test_errors(store, tmp_path):
    with pytest.raises(
        RayLtError, match=r"no finished trial runs of experiment 'empty' in sqlite"
    ):
        build_report(store["uri"], "empty", tmp_path)
    with pytest.raises(RayLtError, match=r"experiment 'nope' not found .*known: .*quickstart"):
        build_report(store["uri"], "nope", tmp_path)
    missing_db = tmp_path / "no" / "mlflow.db"
    with pytest.raises(RayLtError, match="does not exist"):
        build_report(f"sqlite:///{missing_db}", "quickstart", tmp_path)
    assert not missing_db.exists()
    with pytest.raises(RayLtError, match="metric 'top5' was not logged"):
        build_report(store["uri"], "quickstart", tmp_path, metrics=("top5",))
    # a second head's group is a dash only for a head that was logged at all
    with pytest.raises(RayLtError, match="metric 'soft_few' was not logged"):
        build_report(store["uri"], "quickstart", tmp_path, metrics=("soft_few",))
    with pytest.raises(RayLtError, match="mode must be 'max' or 'min'"):
        build_report(store["uri"], "quickstart", tmp_path, mode="best")
    with pytest.raises(CorruptArtifactError, match="per_class.parquet of run .* unreadable"):
        build_report(store["uri"], "corrupt", tmp_path)
    for exc in (RayLtError,):
        assert issubclass(CorruptArtifactError, exc)


def test_helpers():
    assert format_cell(0.38312, 0.0041) == "38.3 ± 0.4"
    assert format_cell(math.nan, math.nan) == "–"
    assert _nan_stats([0.5]) == (0.5, 0.0)
    mean, std = _nan_stats([0.1, math.nan, 0.3])
    assert mean == pytest.approx(0.2) and std == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert all(math.isnan(x) for x in _nan_stats([math.nan, math.nan]))
    logged = ["overall", "soft_overall", "soft_few"]
    assert _group_of_logged("many", logged) and _group_of_logged("soft_many", logged)
    assert not _group_of_logged("oracle_many", logged)  # that head was never logged
    assert not _group_of_logged("soft_top5", logged) and not _group_of_logged("_many", logged)


# The "sig" experiment: known numbers, so the tests and marks are known (the same cases are
# worked by hand in test_stats.py). method -> seed -> (few, overall); None: not logged (NaN).
SIG = {
    "ce": {"0": (0.10, 0.40), "1": (0.12, 0.45), "2": (0.14, 0.50)},
    # overall: differences 0.02, 0.021, 0.019 over the same seeds -> paired t 34.64, p 0.00083
    # few: identical to the baseline -> p = 1.0, no mark
    "paired": {"0": (0.10, 0.42), "1": (0.12, 0.471), "2": (0.14, 0.519)},
    # other seeds -> Welch; few has one value -> no interval and no test
    "welch": {"0": (0.30, 0.50), "1": (None, 0.54), "3": (None, 0.58)},
}
SIG_METRICS = ("few", "overall")


def _sig_values(method: str, metric: str) -> list[float]:
    i = SIG_METRICS.index(metric)
    return [math.nan if v[i] is None else v[i] for v in SIG[method].values()]


@pytest.fixture(scope="module")
def sig(store):
    """Adds experiment 'sig' (params ``optim/method``) to the shared store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    exp = client.create_experiment("sig", artifact_location=str(store["root"] / "artifacts_s"))
    cids = {}
    for method, seeds in SIG.items():
        cids[method] = f"cfg_{method}"
        for seed, vals in seeds.items():
            values = {m: v for m, v in zip(SIG_METRICS, vals, strict=True) if v is not None}
            _trial(client, exp, cids[method], {"method": method}, seed, values)
    return {"uri": store["uri"], "cids": cids}


@pytest.fixture(scope="module")
def sig_report(sig, tmp_path_factory) -> Report:
    out = tmp_path_factory.mktemp("sig_report")
    baseline = {"optim": {"method": "ce"}}  # nested, as in a config
    return build_report(sig["uri"], "sig", out, metrics=SIG_METRICS, baseline=baseline)


def test_rows_carry_n_and_ci_without_baseline(report, store):
    logged = store["logged"]
    assert report.baseline is None
    for row in report.rows:
        assert not row.baseline and row.comparison == {}
        for m in METRICS:
            n, _, _, lo, hi = mean_ci(logged[row.config_id][m])
            assert row.n[m] == n
            assert _same(row.ci_lo[m], lo) and _same(row.ci_hi[m], hi), (row.config_id, m)
    c = report.rows[2]  # cfg_c few: one finite value of two seeds
    assert c.n["few"] == 1 and math.isnan(c.ci_lo["few"]) and math.isnan(c.ci_hi["few"])
    assert report.rows[1].n["few"] == 0
    md = report.markdown
    assert "n = 1: no interval (lr=0.2: few)." in md
    assert "Fewer values than seeds (NaN runs ignored): lr=0.2 few: 1 of 2." in md
    assert "Marks:" not in md and "Tests vs the baseline" not in md


def test_csv_new_columns_after_the_old_ones(report, store):
    with report.files["csv"].open(newline="", encoding="utf-8") as fh:
        header, *lines = list(csv.reader(fh))
    old = ["label", "config_id", "n_seeds"]
    old += [c for m in METRICS for c in (f"{m}_mean", f"{m}_std", f"best_{m}")]
    old += ["param:optim/epochs", "param:optim/lr", "param:optim/wd"]
    new = [f"{m}_{s}" for m in METRICS for s in ("n", "ci_lo", "ci_hi", "p", "test", "delta")]
    assert header == old + ["baseline"] + new + ["stage"]
    for line in lines:
        r = dict(zip(header, line, strict=True))
        assert r["baseline"] == "false"
        for m in METRICS:
            n, _, _, lo, hi = mean_ci(store["logged"][r["config_id"]][m])
            assert int(r[f"{m}_n"]) == n
            got = [float(r[f"{m}_ci_{k}"]) if r[f"{m}_ci_{k}"] else math.nan for k in ("lo", "hi")]
            assert _same(got[0], lo) and _same(got[1], hi)
            assert r[f"{m}_p"] == r[f"{m}_test"] == r[f"{m}_delta"] == ""


def test_baseline_comparisons_equal_ray_lt_stats(sig_report, sig):
    from scipy import stats as st

    rows = {r.label: r for r in sig_report.rows}
    assert list(rows) == ["method=ce", "method=paired", "method=welch"]
    assert sig_report.baseline == sig["cids"]["ce"]
    assert [r.baseline for r in sig_report.rows] == [True, False, False]
    assert rows["method=ce"].comparison == {}
    base_seeds = list(SIG["ce"])
    for method in ("paired", "welch"):
        row = rows[f"method={method}"]
        assert row.seeds == list(SIG[method])
        for m in SIG_METRICS:
            vals, base = _sig_values(method, m), _sig_values("ce", m)
            n, _, _, lo, hi = mean_ci(vals)
            assert (row.n[m], row.ci_lo[m], row.ci_hi[m]) == (n, pytest.approx(lo), hi) or (
                n == 1 and math.isnan(row.ci_lo[m]) and math.isnan(row.ci_hi[m])
            )
            want = compare(vals, base, list(SIG[method]), base_seeds)
            got = row.comparison[m]
            assert got.test == want.test and _same(got.p, want.p), (method, m)
            assert _same(got.delta, want.delta)
    paired, welch = rows["method=paired"].comparison, rows["method=welch"].comparison
    # and against scipy directly, on the logged numbers
    ce_overall = _sig_values("ce", "overall")
    p_rel = st.ttest_rel(_sig_values("paired", "overall"), ce_overall).pvalue
    assert paired["overall"].test == "paired" and _same(paired["overall"].p, float(p_rel))
    assert significance_mark(paired["overall"].p) == "***"
    assert paired["few"].test == "paired" and paired["few"].p == 1.0  # identical rows
    p_welch = st.ttest_ind(_sig_values("welch", "overall"), ce_overall, equal_var=False).pvalue
    assert welch["overall"].test == "welch" and _same(welch["overall"].p, float(p_welch))
    assert welch["few"].test == "none" and math.isnan(welch["few"].p)
    assert welch["few"].delta == pytest.approx(0.30 - 0.12)


def test_baseline_tables_mark_rows_and_cells(sig_report):
    md = sig_report.markdown
    assert sig_report.files["md"].read_text(encoding="utf-8") == md
    # percent, 1 decimal; half-width of the 95% CI = t_{0.975,2} * std / sqrt(3), t = 4.302653:
    # ce few [.10 .12 .14]: 12.0 ± 2.0, half 4.302653 * 0.02 / sqrt(3) = 0.049683 -> [7.0, 17.0]
    # ce overall [.40 .45 .50]: 45.0 ± 5.0, half 0.124207 -> [32.6, 57.4]
    # paired overall [.42 .471 .519]: 47.0 ± 5.0 (std 0.049508), half 0.122984 -> [34.7, 59.3],
    #   paired p 0.00083 -> '***' (escaped); paired few: identical to ce, p = 1, no mark
    # welch few: one value, bold best, no interval, no test; welch overall [.50 .54 .58]:
    #   54.0 ± 4.0, half 0.099366 -> [44.1, 63.9], bold best; Welch t 2.43, p 0.075: no mark
    table = [
        "| configuration | n | few | overall |",
        "|---|---:|---:|---:|",
        "| method=ce (baseline) | 3 | 12.0 ± 2.0 [7.0, 17.0] | 45.0 ± 5.0 [32.6, 57.4] |",
        "| method=paired | 3 | 12.0 ± 2.0 [7.0, 17.0] | 47.0 ± 5.0 [34.7, 59.3]\\*\\*\\* |",
        "| method=welch | 3 | **30.0 ± 0.0** | **54.0 ± 4.0** [44.1, 63.9] |",
    ]
    assert "\n".join(table) in md
    assert "Marks: t-test of each row against the baseline (method=ce): \\* p < 0.05, " in md
    assert "\\*\\* p < 0.01, \\*\\*\\* p < 0.001." in md
    assert (
        "Tests vs the baseline (two-sided): paired t-test over matched seeds (method=paired: few, "
        "overall); Welch's t-test (method=welch: overall); no test, n < 2 (method=welch: few)."
    ) in md
    assert "n = 1: no interval (method=welch: few)." in md
    tex = sig_report.files["tex"].read_text(encoding="utf-8")
    assert "\\begin{tabular}{lrcc}" in tex and "method=ce (baseline) & 3 & " in tex
    assert "Configuration & $n$ & few & overall \\\\" in tex
    assert tex.count("$^{***}$") == 1 and "{\\scriptsize [32.6, 57.4]}" in tex
    assert "% Marks: t-test of each row against the baseline (method=ce): * p < 0.05" in tex


def test_baseline_csv_columns(sig_report):
    with sig_report.files["csv"].open(newline="", encoding="utf-8") as fh:
        rows = {r["label"]: r for r in csv.DictReader(fh)}
    by_label = {r.label: r for r in sig_report.rows}
    assert [r["baseline"] for r in rows.values()] == ["true", "false", "false"]
    for m in SIG_METRICS:
        assert rows["method=ce"][f"{m}_p"] == rows["method=ce"][f"{m}_test"] == ""
        assert rows["method=ce"][f"{m}_delta"] == "" and rows["method=ce"][f"{m}_n"] == "3"
        for label in ("method=paired", "method=welch"):
            c = by_label[label].comparison[m]
            assert rows[label][f"{m}_test"] == c.test
            assert rows[label][f"{m}_p"] == ("" if math.isnan(c.p) else repr(c.p))
            assert float(rows[label][f"{m}_delta"]) == c.delta  # full precision
    assert rows["method=welch"]["few_n"] == "1" and rows["method=welch"]["few_ci_lo"] == ""
    table = pacsv.read_csv(sig_report.files["csv"])
    assert table.column("baseline").type == pa.bool_()


def test_baseline_errors_write_nothing(store, tmp_path):
    (tmp_path / "table.md").write_text("old report\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        build_report(store["uri"], "quickstart", tmp_path, smoke=False, baseline={"lr": 0.3})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("baseline lr=0.3 matches no row of 'quickstart'; ")
    assert "rows: lr=0.05; lr=0.1; lr=0.2 " in msg and "optim/lr" in msg
    assert (tmp_path / "table.md").read_text(encoding="utf-8") == "old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    with pytest.raises(ConfigError, match=r"^baseline lr=0.05 matches 2 rows of 'quickstart' "):
        build_report(store["uri"], "quickstart", tmp_path, baseline={"lr": "0.05"})  # + smoke
    with pytest.raises(ConfigError, match="non-empty mapping"):
        build_report(store["uri"], "quickstart", tmp_path, baseline={})
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="matches no row"):
        build_report(store["uri"], "quickstart", fresh, baseline={"optim/lr": "0.050"})
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    # params are compared as the strings the sweep logged: 0.05 and "0.05" both match
    rep = build_report(store["uri"], "quickstart", fresh, smoke=False, baseline={"optim/lr": 0.05})
    assert rep.baseline == "cfg_a" and rep.rows[0].label == "lr=0.05"


def _sig_file(tmp_path: Path) -> Path:
    file = tmp_path / "sig.py"
    file.write_text(
        "from ray_lt.experiment import Experiment\n\n"
        "experiment = Experiment(\n"
        "    name='sig', pipeline=lambda config: None, report_metrics=('few', 'overall')\n"
        ")\n",
        encoding="utf-8",
    )
    return file


def test_cli_baseline(sig, tmp_path, capsys):
    from ray_lt.report import main

    file, out = _sig_file(tmp_path), tmp_path / "out"
    args = [str(file), "--tracking-uri", sig["uri"], "--out", str(out)]
    assert main([*args, "--baseline", "method=ce"]) == 0
    stdout = capsys.readouterr().out
    assert "| method=ce (baseline) | 3 |" in stdout and "]\\*\\*\\*" in stdout
    with (out / "table.csv").open(newline="", encoding="utf-8") as fh:
        assert [r["baseline"] for r in csv.DictReader(fh)] == ["true", "false", "false"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*args, "--baseline", "method=sgd,optim/lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: baseline method=sgd,optim/lr=0.1 matches no row of 'sig'; ")
    assert "rows: method=ce; method=paired; method=welch " in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing rewritten
    assert main([*args, "--baseline", "method"]) == 2
    assert "is not KEY=VALUE[,KEY=VALUE]" in capsys.readouterr().err
    assert main(args) == 0  # this Experiment names no baseline: no marks
    assert "(baseline)" not in capsys.readouterr().out


def test_cli_reads_the_experiment_baseline(sig, tmp_path, capsys):
    import ray_lt.report as cli

    file = tmp_path / "sig_base.py"
    file.write_text(
        "from ray_lt.experiment import Experiment\n\n"
        "experiment = Experiment(\n"
        "    name='sig', pipeline=lambda config: None, report_metrics=('few', 'overall'),\n"
        "    baseline={'method': 'paired'},\n"
        ")\n",
        encoding="utf-8",
    )
    args = [str(file), "--tracking-uri", sig["uri"]]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "| method=paired (baseline) | 3 |" in capsys.readouterr().out
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--baseline", "method=ce"]) == 0
    assert "| method=ce (baseline) | 3 |" in capsys.readouterr().out  # the option overrides
    assert cli.parse_baseline("a=1, b/c=[1, 2]") == {"a": "1", "b/c": "[1, 2]"}
