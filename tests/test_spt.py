"""SPT model pieces: Hadamard attention, the Mahalanobis loss, MC dropout, training and the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from specserve.training.layers import DotProductAttention, HadamardAttention, MCDropout, deterministic
from specserve.training.spt.model import SpectralTransformer, SPTConfig, mahalanobis_loss


def _identity_attention(cls, d_model: int, n_heads: int):
    layer = cls(d_model, n_heads)
    with torch.no_grad():
        for lin in (layer.q, layer.k, layer.v, layer.proj):
            lin.weight.copy_(torch.eye(d_model))
            lin.bias.zero_()
    return layer


def test_hadamard_attention_shapes():
    layer = HadamardAttention(32, 4)
    x = torch.randn(3, 17, 32)
    assert layer(x).shape == (3, 17, 32)
    q = torch.randn(3, 4, 17, 8)
    assert layer.attend(q, q, q).shape == (3, 4, 17, 8)


def test_hadamard_attention_small_analytic_case():
    # one head, width 2, identity projections: out = N * softmax_tokens(x * x / sqrt(2)) * x
    layer = _identity_attention(HadamardAttention, 2, 1)
    x = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, -1.0]]])
    s = np.array([[1.0, 0.0], [4.0, 1.0], [0.0, 1.0]]) / math.sqrt(2)
    weights = np.exp(s) / np.exp(s).sum(axis=0, keepdims=True)  # each channel sums to 1 over tokens
    expected = 3 * weights * x[0].numpy()
    got = layer(x)[0].detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # by hand, channel 1 of token 2: weights e^{1/sqrt2} / (1 + 2 e^{1/sqrt2}), times 3 * 1
    e = math.exp(1 / math.sqrt(2))
    assert got[1, 1] == pytest.approx(3 * e / (1 + 2 * e), rel=1e-6)


def test_hadamard_attention_uniform_weights_are_the_identity_on_v():
    layer = _identity_attention(HadamardAttention, 4, 2)
    q = torch.zeros(1, 2, 5, 2)  # Q * K = 0 everywhere: uniform attention over the 5 tokens
    v = torch.randn(1, 2, 5, 2)
    torch.testing.assert_close(layer.attend(q, q, v), v)


def test_dot_product_attention_matches_the_formula():
    layer = _identity_attention(DotProductAttention, 2, 1)
    x = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, -1.0]]])
    a = x[0].numpy()
    s = a @ a.T / math.sqrt(2)
    w = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(layer(x)[0].detach().numpy(), w @ a, rtol=1e-6, atol=1e-7)
    assert layer(torch.randn(2, 9, 2)).shape == (2, 9, 2)


def test_mahalanobis_loss_equals_the_hand_computed_value():
    precision = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    target = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    pred = torch.zeros(2, 2)
    # [1, 2]: 2*1 + 2*0.5*1*2 + 1*4 = 8;  [0, -1]: 1  -> mean 4.5
    assert float(mahalanobis_loss(pred, target, precision)) == pytest.approx(4.5)
    # identity precision: sum of squares per row, averaged
    assert float(mahalanobis_loss(pred, target, torch.eye(2))) == pytest.approx((5 + 1) / 2)


def test_standardisation_sets_the_inverse_label_covariance():
    model = SpectralTransformer(SPTConfig(n_pixels=128, patch_size=32, d_model=8, n_heads=2, depth=1, ffn=8,
                                          head_hidden=8))
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    logs = torch.tensor(np.stack([a, 0.8 * a + 0.6 * rng.normal(size=500)], axis=1), dtype=torch.float32)
    model.set_standardisation(logs, torch.randn(500, 4))
    z = (logs - logs.mean(0)) / logs.std(0)
    cov = np.cov(z.numpy().T)
    np.testing.assert_allclose(model.target_precision.numpy(), np.linalg.inv(cov), rtol=1e-3)
    assert model.target_precision[0, 1] < 0  # correlated labels: a negative off-diagonal


def _tiny(dropout: float = 0.2) -> SpectralTransformer:
    torch.manual_seed(0)
    return SpectralTransformer(SPTConfig(n_pixels=200, patch_size=32, d_model=8, n_heads=2, depth=1, ffn=16,
                                         head_hidden=16, dropout=dropout)).eval()


def test_mc_outputs_differ_between_runs_and_have_the_shapes():
    model = _tiny()
    flux = torch.ones(3, 200) + 0.05 * torch.randn(3, 200)
    with torch.no_grad():
        m1, s1, d1 = model(flux, torch.tensor([16]), torch.zeros(1))
        m2, _, d2 = model(flux, torch.tensor([16]), torch.zeros(1))
    assert m1.shape == (3, 2) and s1.shape == (3, 2) and d1.shape == (16, 3, 2)
    assert not torch.equal(d1, d2) and not torch.equal(m1, m2)
    assert torch.all(s1 > 0)
    logs = torch.log(d1)
    torch.testing.assert_close(m1, torch.exp(logs.mean(0)))
    torch.testing.assert_close(s1, m1 * logs.std(0, unbiased=False) * model.std_scale)
    with deterministic(model), torch.no_grad():
        a, sa, _ = model(flux, torch.tensor([4]), torch.zeros(1))
        b, _, _ = model(flux, torch.tensor([4]), torch.zeros(1))
    assert torch.equal(a, b) and torch.all(sa == 0)


def test_mc_spread_matches_dropout_theory():
    # only the last dropout active: y = W2 (h * m / (1 - p)), Var y_j = p / (1 - p) * sum_i W2_ji^2 h_i^2
    p = 0.2
    model = _tiny(p)
    model.drop1.active = False
    features = torch.randn(1, 8)
    n = 40000
    with torch.no_grad():
        out = model.head(features.repeat(n, 1), torch.tensor(0.37))
        h = torch.nn.functional.gelu(model.hidden(features))[0]
    expected = torch.sqrt(p / (1 - p) * (model.out.weight**2 * h**2).sum(dim=1)).detach()
    got = out.std(dim=0)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0.03)
    # and the mean is the deterministic output (inverted dropout)
    with deterministic(model), torch.no_grad():
        det = model.head(features, torch.tensor(0.0))[0]
    np.testing.assert_allclose(out.mean(0).numpy(), det.numpy(), atol=4 * float(expected.max()) / math.sqrt(n))


def test_mc_dropout_keep_rate_for_any_offset():
    layer = MCDropout(0.3)
    x = torch.ones(200000)
    for offset in (0.0, 0.41, 0.99, 12.5):
        kept = float((layer(x, torch.tensor(offset)) > 0).float().mean())
        assert kept == pytest.approx(0.7, abs=0.005)


def test_config_is_checked():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        SPTConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="attention"):
        SPTConfig(attention="linear")
    with pytest.raises(ValueError, match="mc_samples"):
        SPTConfig(mc_samples=300, mc_samples_max=256)


def test_training_run_writes_checkpoint_metrics_report_and_figure(spt_run):
    bench, run_dir, model, report = spt_run
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "report.json", "report.png"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == model.config.epochs and all("val/mape_age" in r for r in records)
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["set"]["n_test"] == bench.split_indices("test").size == 288
    for row in ("ridge", "gradient_boosting", "label_oracle"):
        assert 0 < on_disk["baselines"][row]["mape_age"] < 100 and 0 < on_disk["baselines"][row]["mape_mass"] < 50
    assert on_disk["ablations_not_trained"] == ["dot_attention", "mse_loss"]
    assert on_disk["target"]["missing_rows"] == ["dot_attention", "mse_loss"] and not on_disk["target"]["met"]
    spt = on_disk["spt"]
    assert set(spt["coverage_1sigma"]) == {"age", "mass"}
    # coverage grows with the interval; calibration on validation puts 1-sigma near 68 % on test
    for t in ("age", "mass"):
        assert spt["coverage_2sigma"][t] >= spt["coverage_1sigma"][t] >= spt["raw_coverage_1sigma"][t]
        assert 0.5 < spt["coverage_1sigma"][t] < 0.85
    # the oracle (true labels) is the best row on this split
    assert on_disk["baselines"]["label_oracle"]["mape_mass"] < on_disk["baselines"]["ridge"]["mape_mass"]


def test_calibration_is_in_the_checkpoint(spt_run):
    from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint

    _, run_dir, model, _ = spt_run
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    scale = checkpoint["state_dict"]["std_scale"].numpy()
    assert np.all(scale > 1.0)  # MC dropout alone under-covers the seismic scatter
    np.testing.assert_allclose(scale, checkpoint["calibration"]["std_scale"], rtol=1e-6)
    reloaded = SpectralTransformer.from_checkpoint(checkpoint)
    torch.testing.assert_close(reloaded.std_scale, model.std_scale)


def test_target_check_needs_every_row_beaten_and_coverage_in_range():
    from specserve.training.spt.evaluate import check_target

    def row(age, mass):
        return {"mape_age": age, "mape_mass": mass}

    rows = {"ridge": row(22, 6.5), "gradient_boosting": row(18.6, 5.5), "dot_attention": row(18, 5.5),
            "mse_loss": row(18, 5.6), "label_oracle": row(16, 5.0)}
    spt = {**row(17.5, 5.2), "coverage_1sigma": {"age": 0.66, "mass": 0.7}}
    assert check_target(spt, rows)["met"]
    assert not check_target({**spt, "mape_age": 18.1}, rows)["met"]  # the MSE ablation wins on age
    assert not check_target({**spt, "coverage_1sigma": {"age": 0.8, "mass": 0.7}}, rows)["met"]
    assert not check_target({**spt, "mape_age": 15.0, "mape_mass": 4.0}, {**rows, "label_oracle": row(12, 3)})["met"]
    partial = check_target(spt, {k: v for k, v in rows.items() if k != "mse_loss"})
    assert partial["missing_rows"] == ["mse_loss"] and not partial["met"]
