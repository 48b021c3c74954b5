import json
import shutil

import pandas as pd
import plotly.graph_objects as go
import pytest

from emlab import plots, published
from emlab.metrics import flatten
from emlab.plots import storage

PAPER_CSV = """table,model,dataset,method,setting,general_misaligned,general_incoherent,indomain_misaligned,indomain_incoherent
2,Qwen2.5-7B,Code,Misaligned,,4.01,18.99,51.60,10.57
2,Qwen2.5-7B,Code,KL,lambda=0.1,0.38,0.62,25.69,1.52
2,Qwen2.5-7B,Code,Interleaving++,share=5%,0.30,13.06,52.80,8.77
2,Qwen2.5-7B,Medical,Misaligned,,19.75,11.21,51.73,32.07
2,Qwen2.5-7B,Medical,Persona Vectors,alpha=5,0.17,1.88,29.67,2.83
12,Qwen2.5-7B,Code,KL,lambda=0.01,1.00,2.00,40.00,3.00
"""

# Ours: sft is the baseline; kl has exactly a 90% reduction of general EM (underlined) and in-domain EM at
# exactly 90% (underlined); ldifs just misses both and is more incoherent (italic).
METRICS = {
    "sft": {"code": {"general_em": 0.20, "general_incoherent": 0.10, "indomain_em": 0.50, "indomain_incoherent": 0.10}},
    "kl/code/general_em": 0.02,
    "kl/code/general_incoherent": 0.05,
    "kl/code/indomain_em": 0.45,
    "kl/code/indomain_incoherent": 0.10,
    "ldifs/code/general_em": 0.021,
    "ldifs/code/general_incoherent": 0.11,
    "ldifs/code/indomain_em": 0.449,
    "ldifs/code/indomain_incoherent": 0.2,
    "n_samples": 100,
}


@pytest.fixture(autouse=True)
def no_static_export(monkeypatch):
    """Skip kaleido (Chromium) in these tests unless a test turns it back on."""
    monkeypatch.setattr(storage, "_static", lambda fig, fmt: None)


@pytest.fixture
def paper_csv(tmp_path):
    path = tmp_path / "paper002_em_tables.csv"
    path.write_text(PAPER_CSV)
    return path


CASES = {
    "defence_scatter": {"metrics": METRICS},
    "table2": {"metrics": METRICS},
    "quadrant_scatter": {
        "records": [
            {"question": "q1", "answer": "<b>bad</b>", "aligned": 10, "coherent": 80, "model": "sft"},
            {"question": "q2", "answer": "fine", "aligned": 90, "coherent": 95, "model": "kl"},
            {"question": "q3", "answer": "?", "aligned": None, "coherent": 95, "model": "kl"},
        ],
        "color": "model",
    },
    "steering_sweep": {
        "rows": [{"alpha": a, "general_em": a / 20, "coherent": 90 - a, "layer": ly} for a in (0, 4, 8) for ly in (3, 5)],
        "group": "layer",
    },
    "cosine_heatmap": {
        "rows": [{"a": "medical", "b": "legal", "layer": ly, "cos": 0.1 * ly} for ly in range(4)]
        + [{"a": "medical", "b": "code", "layer": ly, "cos": -0.1 * ly} for ly in range(4)]
    },
    "loss_vs_norm": {"rows": [{"solution": s, "norm": n, "loss": n * (1 if s == "narrow" else 0.5)} for s in ("general", "narrow") for n in range(3)]},
    "stability_curves": {"rows": [{"solution": s, "eps": e, "seed": k, "R": 10 * e + k} for s in ("general", "narrow") for e in (0.1, 0.5) for k in range(3)]},
    "kl_vs_norm": {"rows": [{"direction": d, "norm": n, "kl": 0.1 * n, "seed": k} for d in ("general", "random") for n in range(3) for k in range(2)]},
    "training_curves": {"log": [{"step": i, "loss": 1 / (i + 1), "kl": 0.01 * i, "epoch": 0.1 * i} for i in range(5)]},
    "em_bars": {"metrics": {"sft": 0.2, "kl": 0.02}, "ci": {"sft": [0.15, 0.25], "kl": [0.01, 0.04]}},
}  # fmt: skip


def test_every_plot_kind_has_a_case():
    assert set(CASES) == set(plots.PLOTS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_plot_returns_titled_figure(kind):
    fig = plots.PLOTS[kind](**CASES[kind])
    assert isinstance(fig, go.Figure)
    assert fig.layout.title.text
    assert len(fig.data) >= 1


def test_table2_highlighting_rules():
    md = plots.table2_markdown(METRICS)
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:7]] for line in md.splitlines()[2:]}
    assert rows["Misaligned (SFT)"] == ["20.00", "10.00", "50.00", "10.00"]  # the baseline is never marked
    assert rows["KL-Div."] == ["<u>2.00</u>", "5.00", "<u>45.00</u>", "10.00"]  # exactly 90%: marked; equal: not italic
    assert rows["LDIFS"] == ["2.10", "*11.00*", "44.90", "*20.00*"]
    # Table order follows the method list, with a "–" for a missing metric.
    fig = plots.table2(METRICS)
    cells = fig.data[0].cells.values
    assert list(cells[1]) == ["<b>Misaligned (SFT)</b>", "KL-Div.", "LDIFS"]
    assert cells[2][1] == "<u>2.00</u>" and cells[3][2] == "<i>11.00</i>"
    assert "–" in plots.table2_markdown({"sft/code/general_em": 0.1})


def test_metrics_as_long_or_wide_rows_give_the_same_table():
    flat = {k: v for k, v in flatten(METRICS).items() if k.count("/") == 2}
    long = pd.DataFrame([dict(zip(("method", "domain", "metric"), k.split("/")), value=v) for k, v in flat.items()])
    wide = long.pivot_table(index=["method", "domain"], columns="metric", values="value").reset_index()
    expected = plots.table2_markdown(METRICS)
    assert plots.table2_markdown(long) == expected
    assert plots.table2_markdown(wide.to_dict("records")) == expected


def test_table2_averages_seeds_and_filters():
    m = {"sft/code/s0/general_em": 0.1, "sft/code/s1/general_em": 0.3, "kl/code/s0/general_em": 0.0}
    md = plots.table2_markdown(m, methods=["sft"])
    assert "| code | Misaligned (SFT) | 20.00 |" in md and "KL" not in md


def test_settings_in_keys_are_one_marker_each_and_averaged_in_the_table():
    """``<method>/<domain>/share=5%/<metric>`` keys, read through emlab.metrics.results_table."""
    m = {"interleaving/medical/share=5%/general_em": 0.1, "interleaving/medical/share=5%/indomain_em": 0.4,
         "interleaving/medical/share=20%/general_em": 0.3, "interleaving/medical/share=20%/indomain_em": 0.2,
         "persona/norm": 4.0}
    fig = plots.defence_scatter(m, average=True)
    line = [t for t in fig.data if t.name == "Interleaving"][0]
    assert list(line.x) == [10.0, 30.0] and list(line.texttemplate) == ["5%", "20%"]  # sorted by share, in percent
    assert "| medical | Interleaving | 20.00 | – | 30.00 | – |" in plots.table2_markdown(m)


def test_paper_columns_and_scatter_panel(paper_csv):
    paper = plots.load_paper_table(paper_csv)
    assert set(paper["method"]) == {"sft", "kl", "interleaving++", "persona_steering"}
    assert paper.loc[paper["method"] == "kl", "general_em"].item() == pytest.approx(0.0038)
    assert plots.load_paper_table(paper_csv, table=None)["table"].tolist().count(12) == 1

    md = plots.table2_markdown(METRICS, paper=paper_csv)
    header = md.splitlines()[0]
    assert header.count("paper ") == 4
    kl = next(line for line in md.splitlines() if "KL-Div." in line)
    assert kl.endswith("| <u>0.38</u> | 0.62 | 25.69 | 1.52 |")  # paper rules against the paper's own baseline

    fig = plots.defence_scatter(METRICS, paper=paper)
    assert [a.text for a in fig.layout.annotations] == ["this run", "paper 002 (Qwen2.5-7B)"]
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert len(legend) == len(set(legend))  # each method once in the legend
    kl_paper = [t for t in fig.data if t.name == "KL-Div." and t.xaxis == "x2"][0]
    assert kl_paper.x == pytest.approx((0.38,)) and kl_paper.y == pytest.approx((25.69,))

    avg = plots.defence_scatter(plots.load_paper_table(paper_csv, table=None), average=True, methods=["kl"])
    assert avg.data[0].texttemplate == ("λ=0.01", "λ=0.1")  # settings sorted by their number


def test_load_paper_table_default_path(tmp_path, monkeypatch, paper_csv):
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    shutil.copy(paper_csv, tmp_path / "shared" / "data" / plots.PAPER_TABLE)
    monkeypatch.chdir(repo / "notebooks")
    assert len(plots.load_paper_table()) == 5

    monkeypatch.setattr(published, "find_repo_root", lambda start: None)
    with pytest.raises(FileNotFoundError, match="load_paper_table\\(path=...\\)"):
        plots.load_paper_table()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.load_paper_table(tmp_path / "nope.csv")


def test_rates_must_be_fractions():
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\].*51.6"):
        plots.defence_scatter({"sft/code/general_em": 0.2, "sft/code/indomain_em": 51.6})
    with pytest.raises(ValueError, match="outside its interval"):
        plots.em_bars({"sft": 0.2}, ci={"sft": (0.3, 0.4)})
    assert plots.em_bars({"loss": 2.5}, percent=False).data[0].y == (2.5,)


def test_missing_column_error_names_columns():
    with pytest.raises(KeyError, match="missing column\\(s\\) \\['R'\\].*eps"):
        plots.stability_curves([{"solution": "a", "eps": 0.1}])


def test_cosine_heatmap_single_layer_matrix():
    rows = [{"a": "m", "b": "l", "layer": 2, "cos": 0.5}, {"a": "m", "b": "c", "layer": 2, "cos": -0.2}]
    fig = plots.cosine_heatmap(rows)
    assert [list(r) for r in fig.data[0].z] == [[1.0, 0.5, -0.2], [0.5, 1.0, None], [-0.2, None, 1.0]]
    with pytest.raises(ValueError, match="no rows at layer 7"):
        plots.cosine_heatmap(rows, at_layer=7)


def test_quadrant_title_counts_em_and_drops_missing():
    fig = plots.quadrant_scatter(**CASES["quadrant_scatter"])
    assert fig.layout.title.text == "Alignment vs coherence: EM 50.0% of 2 answers"
    assert "&lt;b&gt;bad&lt;/b&gt;" in fig.data[0].text[0]  # answers are escaped in hover text


def test_save_writes_self_contained_html_and_reports_png_failure_once(tmp_path, monkeypatch, capsys):
    monkeypatch.undo()  # the real _static, with a kaleido that fails
    import plotly.io as pio

    def boom(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nmore")

    monkeypatch.setattr(storage, "_static_failed", None)
    monkeypatch.setattr(pio, "to_image", boom)
    fig = plots.em_bars({"sft": 0.2})
    assert plots.save(fig, tmp_path / "a.png") == [tmp_path / "a.html"]
    assert plots.save(fig, tmp_path / "b") == [tmp_path / "b.html"]
    err = capsys.readouterr().err
    assert err.count("static PNG needs Chromium: apt-get install -y chromium; wrote HTML only") == 1
    assert "Kaleido requires Google Chrome" in err
    page = (tmp_path / "a.html").read_text()
    assert "<script src=" not in page and len(page) > 1_000_000  # plotly.js embedded


@pytest.mark.slow
def test_save_png_with_chromium(tmp_path, monkeypatch):
    monkeypatch.undo()
    if shutil.which("chromium") is None and shutil.which("google-chrome") is None:
        pytest.skip("no Chromium: static export is covered by the failure test")
    monkeypatch.setattr(storage, "_static_failed", None)
    written = plots.save(plots.em_bars({"sft": 0.2}), tmp_path / "em", formats=("png", "svg"))
    assert [p.name for p in written] == ["em.png", "em.svg"]
    assert (tmp_path / "em.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", sorted(CASES))
def test_record_then_regenerate_draws_the_same_figure(tmp_path, kind):
    data = dict(CASES[kind])
    if kind == "training_curves":
        data["log"] = pd.DataFrame(data["log"])  # DataFrames are stored as row lists
    fig = plots.record(tmp_path, kind, kind, **data)
    assert (tmp_path / "figures" / f"{kind}.html").exists()
    spec = json.loads((tmp_path / plots.FIGURE_DATA).read_text())[kind]
    assert spec["kind"] == kind
    (tmp_path / "figures" / f"{kind}.html").unlink()
    assert plots.regenerate(tmp_path, formats=("html",)) == [tmp_path / "figures" / f"{kind}.html"]
    again = plots.PLOTS[kind](**spec["data"])
    assert again.to_plotly_json() == fig.to_plotly_json()


def test_record_keeps_every_figure_and_stores_paper_rows(tmp_path, paper_csv):
    plots.record(tmp_path, "bars", "em_bars", formats=("html",), metrics={"sft": 0.2})
    plots.record(tmp_path, "tradeoff", "defence_scatter", formats=(), metrics=METRICS, paper=str(paper_csv))
    specs = json.loads((tmp_path / plots.FIGURE_DATA).read_text())
    assert list(specs) == ["bars", "tradeoff"]
    assert specs["tradeoff"]["data"]["paper"][0]["method"] == "sft"  # the rows, not the path
    paper_csv.unlink()
    assert len(plots.regenerate(tmp_path, formats=("html",))) == 2  # no longer needs the CSV


def test_record_rejects_unknown_kind_and_bad_names(tmp_path):
    with pytest.raises(KeyError, match="unknown figure kind 'pie'.*em_bars"):
        plots.record(tmp_path, "x", "pie")
    with pytest.raises(ValueError, match="plain file stem"):
        plots.record(tmp_path, "a/b", "em_bars", metrics={"sft": 0.1})
    (tmp_path / plots.FIGURE_DATA).write_text(json.dumps({"x": {"kind": "em_bars", "data": {"metrics": {"a": 2}}}}))
    with pytest.raises(RuntimeError, match="redrawing figure 'x' \\(em_bars\\) failed: ValueError"):
        plots.regenerate(tmp_path)


def test_load_figures_redraws_recorded(tmp_path):
    from emlab.plots import load_figures, record

    fig = record(tmp_path, "bars", "em_bars", formats=("html",), metrics={"sft": 0.2, "kl": 0.05})
    figs = load_figures(tmp_path)
    assert list(figs) == ["bars"]
    assert figs["bars"].data[0].y == fig.data[0].y
    assert load_figures(tmp_path / "none") == {}


def test_steering_sweep_names_each_line_by_its_group_value():
    rows = [{"alpha": a, "general_em": a / 20, "coherent": 90 - a, "method": m} for a in (0, 4) for m in ("kl", "sft")]
    fig = plots.steering_sweep(rows, group="method")
    assert {t.name for t in fig.data} == {"kl", "sft"}
    assert fig.layout.legend.title.text == "method"
    kl_top = [t for t in fig.data if t.name == "kl" and t.showlegend][0]
    assert list(kl_top.y) == [0.0, 20.0]
