"""The parallel scaling law fit (parscale.scaling_law), its plots and `parscale fit`."""

import json
import math
import warnings

import numpy as np
import pytest

from parscale.cli import main
from parscale.errors import ParScaleError
from parscale.scaling_law import (
    PAPER_GRID,
    _make_objective,
    fit_law,
    law,
    load_csv,
    load_paper_data,
)

# Constants printed by the authors' fitting procedure (arXiv 2505.10475).
PAPER = {
    "stack": {"E": 0.6912, "A": 0.01131, "alpha": 0.1894, "k": 0.3935, "r2": 0.9978},
    "pile": {"E": 1.2888, "A": 0.1974, "alpha": 0.1963, "k": 0.3345, "r2": 0.9987},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def paper_fits():
    return {name: fit_law(*load_paper_data(name)) for name in PAPER}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_reproduces_paper_constants(paper_fits, name):
    fit, want = paper_fits[name], PAPER[name]
    for key in ("E", "A", "alpha", "k"):
        assert getattr(fit, key) == pytest.approx(want[key], rel=5e-3), key
    assert fit.r2 == pytest.approx(want["r2"], abs=1e-3)
    assert fit.n_points == 24 and fit.n_starts == len(PAPER_GRID["E"]) * 5 * 5 * 4 == 300


def test_screened_fit_equals_running_every_start_to_convergence(paper_fits):
    # screen_iters=None: every one of the 300 starts runs to scipy's default convergence, as in
    # the authors' script; the fast default must land on the same optimum.
    full = fit_law(*load_paper_data("pile"), screen_iters=None)
    fast = paper_fits["pile"]
    assert fast.objective <= full.objective * (1 + 1e-9)
    for key in ("E", "A", "alpha", "k"):
        assert getattr(fast, key) == pytest.approx(getattr(full, key), rel=1e-5)


def test_custom_grid(paper_fits):
    N, P, loss = load_paper_data("stack")
    one = fit_law(N, P, loss, grid={"E": [0.5], "A": [0.01], "alpha": [0.2], "k": [0.4]})
    assert one.n_starts == 1 and one.E == pytest.approx(paper_fits["stack"].E, rel=1e-4)
    two = fit_law(N, P, loss, grid=np.array([[0.5, 0.01, 0.2, 0.4], [1.0, 1.0, 1.0, 0.2]]))
    assert two.n_starts == 2 and two.objective == pytest.approx(paper_fits["stack"].objective, rel=1e-8)
    with pytest.raises(ParScaleError, match="missing values for k"):
        fit_law(N, P, loss, grid={"E": [0.5], "A": [0.01], "alpha": [0.2]})


def test_objective_is_the_papers_summed_huber_on_log_loss(paper_fits):
    fit = paper_fits["stack"]
    r = np.log(fit.loss) - np.log(fit.predict(fit.N, fit.P))
    d = 1e-3
    huber = np.where(np.abs(r) <= d, 0.5 * r**2, d * (np.abs(r) - 0.5 * d))
    assert fit.objective == pytest.approx(huber.sum(), rel=1e-9)
    assert fit.objective < 1e-4  # (the mean would be 24x smaller)


def test_analytic_gradient_matches_finite_differences():
    N, P, loss = load_paper_data("stack")
    objective = _make_objective(N, P, loss, 1e-3)
    for theta in ([0.7, 0.011, 0.19, 0.39], [0.5, 2.0, 1.0, 0.3], [1.2, 0.2, 0.6, 0.7]):
        theta = np.array(theta)
        _, grad = objective(theta)
        for i in range(4):
            h = 1e-6 * theta[i]
            up, down = theta.copy(), theta.copy()
            up[i] += h
            down[i] -= h
            numeric = (objective(up)[0] - objective(down)[0]) / (2 * h)
            assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-10)


def test_recovers_parameters_of_noiseless_simulated_data():
    N, P, _ = load_paper_data("pile")
    true = {"E": 0.5, "A": 2.0, "alpha": 0.35, "k": 0.6}
    fit = fit_law(N, P, law(N, P, **true))
    for key, value in true.items():
        assert getattr(fit, key) == pytest.approx(value, rel=1e-4), key
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_recovers_parameters_from_noisy_simulated_data():
    # 24 points on the paper's (N, P) grid, 0.1 % multiplicative noise. E, A and alpha trade off
    # against each other (A worst), so the tolerances differ; k and the curve are pinned tightly.
    N, P, _ = load_paper_data("pile")
    true = {"E": 1.2888, "A": 0.1974, "alpha": 0.1963, "k": 0.3345}
    clean = law(N, P, **true)
    noisy = clean * (1 + 1e-3 * np.random.default_rng(0).standard_normal(N.size))
    fit = fit_law(N, P, noisy)
    assert fit.k == pytest.approx(true["k"], rel=0.05)
    assert fit.E == pytest.approx(true["E"], rel=0.10)
    assert fit.alpha == pytest.approx(true["alpha"], rel=0.20)
    assert 0.5 < fit.A / true["A"] < 2.0
    assert np.max(np.abs(fit.predict(N, P) / clean - 1)) < 2.5e-3


def test_predict_law_and_equivalent_params_agree(paper_fits):
    fit = paper_fits["stack"]
    N = np.array([5e8, 1e9, 4e9])
    P = np.array([1.0, 2.0, 4.0, 8.0])
    grid = fit.predict(N[:, None], P[None, :])
    assert grid.shape == (3, 4)
    # the law depends on (N, P) only through the equivalent parameter count N·(k ln P + 1)
    equivalent = fit.equivalent_params(N[:, None], P[None, :])
    np.testing.assert_allclose(fit.predict(equivalent, 1), grid, rtol=1e-12)
    np.testing.assert_allclose(equivalent[:, 0], N)  # P = 1 changes nothing
    assert fit.multiplier(8) == pytest.approx(fit.k * math.log(8) + 1)
    by_hand = fit.E + (fit.A * 1e9 / (1e9 * (fit.k * math.log(4) + 1))) ** fit.alpha
    assert fit.predict(1e9, 4) == pytest.approx(by_hand, rel=1e-12)
    assert law(1e9, 4, fit.E, fit.A, fit.alpha, fit.k) == pytest.approx(by_hand, rel=1e-12)
    assert np.all(np.diff(grid, axis=1) < 0) and np.all(np.diff(grid, axis=0) < 0)  # more P or N: lower loss


def test_residual_rows_and_r2(paper_fits):
    fit = paper_fits["pile"]
    rows = fit.residuals()
    assert len(rows) == 24
    for row, n, p, y in zip(rows, fit.N, fit.P, fit.loss):
        assert (row.N, row.P, row.loss) == (n, p, y)
        assert row.predicted == pytest.approx(float(fit.predict(n, p)))
        assert row.residual == pytest.approx(row.predicted - row.loss)
        assert row.relative_error == pytest.approx(row.residual / row.loss)
    res = np.array([r.residual for r in rows])
    assert fit.r2 == pytest.approx(1 - np.sum(res**2) / np.sum((fit.loss - fit.loss.mean()) ** 2))
    d = fit.to_dict()
    assert set(d) >= {"E", "A", "alpha", "k", "r2", "objective", "n_points", "residuals"}
    json.dumps(d)


def test_bootstrap_intervals_contain_the_estimate_and_are_reproducible(paper_fits):
    fit = paper_fits["stack"]
    boot = fit.bootstrap(n=12, seed=3)
    assert boot.samples.shape == (12, 4)
    for name, (lo, hi) in boot.intervals.items():
        assert lo <= getattr(fit, name) <= hi, name
        assert lo < hi, name  # resampling really moves the fit
    again = fit.bootstrap(n=12, seed=3)
    np.testing.assert_array_equal(boot.samples, again.samples)
    d = boot.to_dict()
    assert d["level"] == 0.95 and d["n"] == 12 and set(d["intervals"]) == {"E", "A", "alpha", "k"}
    json.dumps(d)
    with pytest.raises(ParScaleError, match="at least 2"):
        fit.bootstrap(n=1)


def test_no_runtime_warnings_even_far_from_the_optimum():
    N, P, loss = load_paper_data("stack")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_law(N, P, loss)
        fit_law(N, P, loss[::-1])  # loss rising with N: the search wanders to the bounds
        fit.bootstrap(n=3)
        assert np.all(np.isfinite(law(N, P, 1.0, 1e4, 500.0, 0.3)))  # would overflow computed naively


def test_paper_data_file():
    N, P, loss = load_paper_data("stack")
    assert N.shape == P.shape == loss.shape == (24,)
    assert sorted(set(P)) == [1, 2, 4, 8]
    assert (N[0], P[0], loss[0]) == (535813376, 1, 1.1722)
    assert load_paper_data("pile")[2][-1] == 1.7772
    with pytest.raises(ParScaleError, match="unknown paper data set 'c4'"):
        load_paper_data("c4")


def test_load_csv_reads_valid_file(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("# my runs\nloss,extra,P,params\n\n1.2,x,1,5e8\n1.1,y,2,1e9\n1.0,z,4,2e9\n0.9,w,8,4e9\n")
    N, P, loss = load_csv(path)
    np.testing.assert_array_equal(N, [5e8, 1e9, 2e9, 4e9])
    np.testing.assert_array_equal(P, [1, 2, 4, 8])
    np.testing.assert_array_equal(loss, [1.2, 1.1, 1.0, 0.9])


GOOD_ROWS = "1e9,1,2.0\n2e9,2,1.9\n3e9,4,1.8\n4e9,8,1.7\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("params,P\n1e9,1\n", r"missing column 'loss'"),
        ("params,P,loss\n1e9,1,2.0\n1e9,x,2.0\n" + GOOD_ROWS, r"line 3: column 'P' value 'x' is not a number"),
        ("params,P,loss\n1e9,1,2.0\n2e9,2,-1\n" + GOOD_ROWS, r"line 3: column 'loss' value '-1' must be a positive"),
        ("params,P,loss\n0,1,2.0\n" + GOOD_ROWS, r"line 2: column 'params' value '0' must be a positive"),
        ("# c\nparams,P,loss\n1e9,1,2.0\n1e9,0.5,2\n" + GOOD_ROWS, r"line 4: P = 0.5 is below 1"),
        ("params,P,loss\n1e9,1,nan\n" + GOOD_ROWS, r"line 2: column 'loss' value 'nan' must be a positive"),
        ("params,P,loss\n1e9,1\n" + GOOD_ROWS, r"line 2: no value in column 'loss'"),
        ("params,P,loss\n1e9,1,2.0\n2e9,2,1.9\n3e9,2,1.8\n", r"only 3 data row\(s\).*needs at least 4"),
        ("# only a comment\n", r"no header row"),
    ],
)
def test_bad_csv_gives_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ParScaleError, match=message):
        load_csv(path)


def test_missing_csv_and_bad_arrays(tmp_path):
    with pytest.raises(ParScaleError, match="no such file"):
        load_csv(tmp_path / "nope.csv")
    with pytest.raises(ParScaleError, match="same length"):
        fit_law([1e9, 2e9, 3e9, 4e9], [1, 2, 4, 8], [1.0, 0.9, 0.8])
    with pytest.raises(ParScaleError, match="needs at least 4"):
        fit_law([1e9, 2e9, 3e9], [1, 2, 4], [1.0, 0.9, 0.8])
    with pytest.raises(ParScaleError, match="P"):
        fit_law([1e9, 2e9, 3e9, 4e9], [1, 2, 0.5, 8], [1.0, 0.9, 0.8, 0.7])


def test_cli_json_with_plot_and_bootstrap(tmp_path, capsys):
    out_png = tmp_path / "law.png"
    assert main(["fit", "--data", "paper-pile", "--json", "--plot", str(out_png), "--bootstrap", "4"]) == 0
    data = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    for key in ("E", "A", "alpha", "k"):
        assert data[key] == pytest.approx(PAPER["pile"][key], rel=5e-3)
    assert data["r2"] == pytest.approx(PAPER["pile"]["r2"], abs=1e-3)
    assert data["n_points"] == 24 and len(data["residuals"]) == 24
    assert set(data["bootstrap"]["intervals"]) == {"E", "A", "alpha", "k"}
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in tmp_path.iterdir() if p.name != "law.png"]  # no temp files left


def test_cli_text_table_and_errors(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    path.write_text("params,P,loss\n" + GOOD_ROWS + "5e9,1,1.75\n")
    assert main(["fit", "--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "R^2" in out and "alpha" in out and "1,000,000,000" in out
    bad = tmp_path / "bad.csv"
    bad.write_text("params,loss\n1,2\n")
    assert main(["fit", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing column 'P'" in err
    assert main(["fit", "--data", "paper-stack", "--plot", str(tmp_path / "x.pdf")]) == 2
    assert ".png" in capsys.readouterr().err


def test_plot_multiplier(tmp_path, paper_fits):
    path = tmp_path / "mult.png"
    from parscale.plots.law import plot_multiplier

    assert plot_multiplier({"ours": paper_fits["stack"], "paper (Pile)": 0.3345}, path) == path
    assert path.read_bytes()[:8] == PNG_MAGIC
    plot_multiplier([0.2, 0.4], tmp_path / "two.png", p_max=16)
    assert (tmp_path / "two.png").stat().st_size > 0
    with pytest.raises(ParScaleError, match="nothing to plot"):
        plot_multiplier([], tmp_path / "none.png")
