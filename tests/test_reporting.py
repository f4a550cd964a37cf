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

from ray_lt.errors import CorruptArtifactError, RayLtError
from ray_lt.metrics import GROUP_NAMES, shot_groups
from ray_lt.reporting import (
    Report,
    _group_of_logged,
    _load_per_class,
    _nan_stats,
    build_report,
    format_cell,
    latex_escape,
)

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
    for row in report.rows:
        cells = [c.strip() for c in lines[row.label].split("|")[2:-1]]
        for m, cell in zip(METRICS, cells, strict=True):
            mean, std = _expected(store["logged"][row.config_id][m])
            text = "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"
            if report.best[m] == row.config_id:
                text = f"**{text}**"
            assert cell == text, (row.label, m)
    assert "seeds per row: lr=0.05: 3, lr=0.1: 3, lr=0.2: 2." in md
    assert "Skipped 2 unfinished trial runs (FAILED: 1, RUNNING: 1)." in md
    assert md.count("**") == 2 * len(METRICS)


def test_latex_is_booktabs_and_escaped(report):
    tex = report.files["tex"].read_text(encoding="utf-8")
    for token in ("\\begin{tabular}{lcccc}", "\\toprule", "\\midrule", "\\bottomrule"):
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
    png = report.files["png"]
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
    assert rep.skipped_runs == 0 and "png" not in rep.files  # the smoke run has no per_class
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
