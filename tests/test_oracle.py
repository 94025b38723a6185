"""The NMF oracle's fit without the dense matrix: the low-rank-plus-sparse completed matrix gives
the same products as its dense form, HALS on it reaches scikit-learn's NMF objective on the dense
form, and the EM-completed factorisation equals a dense re-implementation of the same steps."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import NMF

from metarec.feedback.oracle import _biases, _FilledMatrix, _hals_nmf, _nmf_factors, _rowdots


@pytest.fixture(scope="module")
def ratings():
    """80 users x 50 items, 900 distinct observed cells with ratings 1-5 from a rank-3 taste model."""
    gen = np.random.default_rng(11)
    cells = gen.choice(80 * 50, 900, replace=False)
    ui, ii = cells // 50, cells % 50
    taste = gen.random((80, 3)) @ gen.random((3, 50))
    y = np.clip(np.rint(1 + 4 * taste[ui, ii] / taste.max() + gen.normal(0, 0.5, ui.size)), 1, 5)
    return ui, ii, y


def _dense(ui, ii, y, a, b):
    x = a @ b.T
    x[ui, ii] = y
    return x


def test_the_filled_matrix_gives_the_dense_products(ratings) -> None:
    ui, ii, y = ratings
    gen = np.random.default_rng(0)
    a, b = gen.random((80, 4)), gen.random((50, 4))
    x = _FilledMatrix.observed_over(a, b, ui, ii, y, (80, 50))
    dense = _dense(ui, ii, y, a, b)
    h, w = gen.random((5, 50)), gen.random((80, 5))
    assert np.allclose(x.times_t(h), dense @ h.T, atol=1e-12)
    assert np.allclose(x.t_times(w), w.T @ dense, atol=1e-12)
    assert x.mean() == pytest.approx(dense.mean(), rel=1e-12)
    assert x.sq_norm() == pytest.approx((dense ** 2).sum(), rel=1e-12)
    assert np.allclose(_rowdots(a, b, ui, ii, chunk=7), (a @ b.T)[ui, ii], atol=1e-12)


def test_hals_reaches_scikit_learns_objective_on_the_dense_matrix(ratings) -> None:
    ui, ii, y = ratings
    g, b_u, b_i = _biases(80, 50, ui, ii, y)
    a, b = np.column_stack([g + b_u, np.ones(80)]), np.column_stack([np.ones(50), b_i])
    dense = _dense(ui, ii, y, a, b)
    w, h = _hals_nmf(_FilledMatrix.observed_over(a, b, ui, ii, y, (80, 50)), 6, seed=0)
    assert (w >= 0).all() and (h >= 0).all()
    ours = np.linalg.norm(dense - w @ h)
    ref = NMF(n_components=6, init="nndsvda", random_state=0, max_iter=2000, tol=1e-6)
    theirs = np.linalg.norm(dense - ref.fit_transform(dense) @ ref.components_)
    assert ours <= 1.02 * theirs, (ours, theirs)
    assert ours < 0.5 * np.linalg.norm(dense - dense.mean())          # and it explains the matrix


def test_em_steps_equal_a_dense_re_implementation(ratings) -> None:
    """Each EM step refits the matrix whose missing cells hold the previous reconstruction; the same
    steps on dense arrays (the same initialisation, the same HALS) give the same factors."""
    ui, ii, y = ratings
    w, h = _nmf_factors(80, 50, ui, ii, y, rank=4, seed=3, iterations=2)
    g, b_u, b_i = _biases(80, 50, ui, ii, y)
    filled = _dense(ui, ii, y, np.column_stack([g + b_u, np.ones(80)]), np.column_stack([np.ones(50), b_i]))
    for step in range(2):
        class Dense(_FilledMatrix):           # the same interface over the explicit matrix
            def __init__(self, m):
                self.m, self.shape = m, m.shape

            def times_t(self, hh):
                return self.m @ hh.T

            def t_times(self, ww):
                return ww.T @ self.m

            def mean(self):
                return float(self.m.mean())

            def sq_norm(self):
                return float((self.m ** 2).sum())

        dw, dh = _hals_nmf(Dense(filled), 4, seed=3 + step)
        filled = dw @ dh
        filled[ui, ii] = y
    assert np.allclose(w @ h, dw @ dh, atol=1e-9)


def test_the_gbdt_oracle_fits_on_a_seeded_sample_only_above_its_cap(monkeypatch) -> None:
    """Above GBDT_MAX_FIT ratings the trees see a seeded sample (the same on every run), and still
    score every observed rating and every kept user x item; at or below it nothing changes."""
    from metarec.data.synthetic import generate
    from metarec.feedback import oracle

    data, _ = generate({"seed": 5, "n_users": 120, "n_items": 90, "n_ratings": 4000, "min_per_user": 20})
    users = np.sort(data.users["user_id"].to_numpy())[:30]
    whole = oracle.fit_oracle("gbdt", data, 0, only_users=users)
    monkeypatch.setattr(oracle, "GBDT_MAX_FIT", len(data.ratings))
    assert np.array_equal(oracle.fit_oracle("gbdt", data, 0, only_users=users).utility, whole.utility)
    monkeypatch.setattr(oracle, "GBDT_MAX_FIT", 1500)
    capped = oracle.fit_oracle("gbdt", data, 0, only_users=users)
    again = oracle.fit_oracle("gbdt", data, 0, only_users=users)
    assert capped.utility.shape == whole.utility.shape == (30, 90)
    assert np.array_equal(capped.utility, again.utility) and capped.fit_rmse == again.fit_rmse
    assert not np.array_equal(capped.utility, whole.utility)
