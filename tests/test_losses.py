"""CMO / CAL / vanilla losses against values computed by hand (see docs/method.md).

The hand examples use batch 2, sequence 4, vocabulary 3. Logits are log-probabilities chosen
by hand, so softmax gives back exactly the probabilities written in the test; every delta,
clamp, moving average and the final loss is written out below, not taken from dpa_core.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpa_core.losses import LossConfig, cal_loss, cmo_loss, contrastive_loss, smooth, vanilla_loss

IGN = -100

# Unshifted labels. Position t of the logits predicts label t + 1, so the scored (shifted) labels are
#   row 0: [1, 2, -100]      row 1: [-100, 0, 1]
# flattened: [1, 2, -100, -100, 0, 1]; stand-in label 0 where ignored -> scored [1, 2, 0, 0, 0, 1];
# targets at flat positions 0, 1, 4, 5.
LABELS = torch.tensor([[IGN, 1, 2, IGN], [IGN, IGN, 0, 1]])

# p = probabilities with the image, q = without, for the 3 scored positions of each row.
# The 4th position of each row predicts nothing (it is dropped by the shift); it gets values that
# would change the result if the shift were wrong.
P = [
    [[0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25], [0.98, 0.01, 0.01]],
    [[0.1, 0.45, 0.45], [0.4, 0.3, 0.3], [0.25, 0.5, 0.25], [0.01, 0.01, 0.98]],
]
Q = [
    [[0.3, 0.4, 0.3], [0.1, 0.7, 0.2], [0.2, 0.4, 0.4], [0.01, 0.98, 0.01]],
    [[0.6, 0.2, 0.2], [0.3, 0.35, 0.35], [0.25, 0.25, 0.5], [0.98, 0.01, 0.01]],
]
# By hand: delta = p[label] - q[label] (label = scored label above)
#   row 0: position 0 (label 1) 0.7-0.4=0.3, position 1 (label 2) 0.8-0.2=0.6, position 2 (stand-in 0) 0.5-0.2=0.3
#   row 1: position 0 (stand-in 0) 0.1-0.6=-0.5, position 1 (label 0) 0.4-0.3=0.1, position 2 (label 1) 0.5-0.25=0.25
# clamp [0.05, 0.5]:            [0.3, 0.5, 0.3, 0.05, 0.1, 0.25]
# flat width-3 average (edges over 2 cells, crossing the row boundary between flat 2 and 3):
W_FLAT = [(0.3 + 0.5) / 2, (0.3 + 0.5 + 0.3) / 3, (0.5 + 0.3 + 0.05) / 3,
          (0.3 + 0.05 + 0.1) / 3, (0.05 + 0.1 + 0.25) / 3, (0.1 + 0.25) / 2]
# CE of each target = -log p[label]: flat 0 -> -log 0.7, 1 -> -log 0.8, 4 -> -log 0.4, 5 -> -log 0.5
CE_T = {0: -math.log(0.7), 1: -math.log(0.8), 4: -math.log(0.4), 5: -math.log(0.5)}


def _logits(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def _expected(weights: dict[int, float]) -> float:
    return sum(weights[j] * CE_T[j] for j in CE_T) / (sum(weights[j] for j in CE_T) + 1e-6)


def test_cmo_loss_by_hand_flat():
    expected = _expected(dict(enumerate(W_FLAT)))
    # Written-out value of the same formula (0.4*0.35667 + 0.36667*0.22314 + 0.13333*0.91629 + 0.175*0.69315) / 1.075
    assert expected == pytest.approx(0.435313, abs=1e-5)
    got = cmo_loss(_logits(P), _logits(Q), LABELS)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_cmo_uses_probabilities_not_logits():
    """Shifting all logits of a position by a constant leaves the softmax, so the CMO loss, unchanged."""
    q = _logits(Q) + torch.tensor([3.0, -2.0, 7.0, 1.0])[None, :, None]
    assert cmo_loss(_logits(P), q, LABELS).item() == pytest.approx(_expected(dict(enumerate(W_FLAT))), abs=1e-6)


def test_cmo_loss_by_hand_per_sequence():
    # Targets only, each row on its own: row 0 targets [0.3, 0.5] -> both 0.4; row 1 targets [0.1, 0.25] -> both 0.175
    w = {0: 0.4, 1: 0.4, 4: 0.175, 5: 0.175}
    expected = _expected(w)
    assert expected == pytest.approx(0.513580 / 1.15, abs=1e-5)
    got = cmo_loss(_logits(P), _logits(Q), LABELS, smoothing="per_sequence")
    assert got.item() == pytest.approx(expected, abs=1e-6)
    flat = cmo_loss(_logits(P), _logits(Q), LABELS)
    assert abs(got.item() - flat.item()) > 1e-3  # the two smoothings really differ here


def test_per_sequence_equals_flat_when_nothing_is_ignored_and_batch_is_one():
    g = torch.Generator().manual_seed(0)
    logits, logits_ni = torch.randn(1, 7, 5, generator=g), torch.randn(1, 7, 5, generator=g)
    labels = torch.randint(0, 5, (1, 7), generator=g)
    kw = dict(delta_min=0.0, delta_max=1.0)
    assert cmo_loss(logits, logits_ni, labels, smoothing="per_sequence", **kw).item() == pytest.approx(
        cmo_loss(logits, logits_ni, labels, **kw).item(), abs=1e-6)


def test_cmo_custom_bounds_and_window_1():
    # Without smoothing (window 1) and bounds [0, 1], the weights are the raw deltas of the targets:
    # 0.3, 0.6, 0.1, 0.25 (flat positions 0, 1, 4, 5)
    w = {0: 0.3, 1: 0.6, 4: 0.1, 5: 0.25}
    got = cmo_loss(_logits(P), _logits(Q), LABELS, delta_min=0.0, delta_max=1.0, window=1)
    assert got.item() == pytest.approx(_expected(w), abs=1e-6)


# CAL: the label's raw logit difference. Image logits are the same log-probabilities; the image-free
# logits equal them except at the scored label, which is lowered by D (so the logit difference is D).
D = [[2.0, 7.0, 0.5], [3.0, -1.0, 4.5]]
SCORED = [[1, 2, 0], [0, 0, 1]]
# clamp [1, 5]: [2, 5, 1, 3, 1, 4.5]; flat width-3 average:
W_CAL = [(2 + 5) / 2, (2 + 5 + 1) / 3, (5 + 1 + 3) / 3, (1 + 3 + 1) / 3, (3 + 1 + 4.5) / 3, (1 + 4.5) / 2]


def _cal_inputs():
    logits = _logits(P)
    ni = logits.clone()
    for b in range(2):
        for t in range(3):
            ni[b, t, SCORED[b][t]] -= D[b][t]
    return logits, ni


def test_cal_loss_by_hand():
    logits, ni = _cal_inputs()
    expected = _expected(dict(enumerate(W_CAL)))
    assert cal_loss(logits, ni, LABELS).item() == pytest.approx(expected, abs=1e-6)
    # Per sequence: row 0 targets [2, 5] -> 3.5, 3.5; row 1 targets [1, 4.5] -> 2.75, 2.75
    expected_seq = _expected({0: 3.5, 1: 3.5, 4: 2.75, 5: 2.75})
    assert cal_loss(logits, ni, LABELS, smoothing="per_sequence").item() == pytest.approx(expected_seq, abs=1e-6)
    # CMO scores the same inputs by probability differences instead, which gives other weights.
    assert abs(cmo_loss(logits, ni, LABELS).item() - expected) > 1e-3


def test_vanilla_is_plain_mean_ce_on_shifted_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = IGN
    labels[2, 4:] = IGN
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGN)
    assert vanilla_loss(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)
    # and for the hand example: mean of the four target CEs
    assert vanilla_loss(_logits(P), LABELS).item() == pytest.approx(sum(CE_T.values()) / 4, abs=1e-6)


def test_gradient_flows_through_ce_only():
    logits = _logits(P).requires_grad_(True)
    ni = _logits(Q).requires_grad_(True)
    cmo_loss(logits, ni, LABELS).backward()
    assert ni.grad is None or torch.count_nonzero(ni.grad) == 0
    # The gradient w.r.t. the image logits is that of sum_j w_j CE_j / sum w with w held constant.
    lg = _logits(P).requires_grad_(True)
    w = torch.tensor(W_FLAT).view(2, 3)
    ce = F.cross_entropy(lg[:, :3].reshape(-1, 3), LABELS[:, 1:].reshape(-1), ignore_index=IGN,
                         reduction="none").view(2, 3)
    target = LABELS[:, 1:] != IGN
    ((w * ce).sum() / (w[target].sum() + 1e-6)).backward()
    torch.testing.assert_close(logits.grad, lg.grad, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(logits.grad[:, 3]) == 0  # the last position predicts nothing


def test_cal_gradient_does_not_reach_image_free_logits():
    logits, ni = _cal_inputs()
    logits.requires_grad_(True)
    ni.requires_grad_(True)
    cal_loss(logits, ni, LABELS).backward()
    assert ni.grad is None or torch.count_nonzero(ni.grad) == 0
    assert logits.grad.abs().sum() > 0


# --- an independent numpy version of the reference, for random inputs -------------------------

def _np_reference(logits, logits_ni, labels, kind, lo, hi, per_sequence=False):
    logits, logits_ni, labels = (np.asarray(x, dtype=np.float64) for x in (logits, logits_ni, labels))
    labels = labels.astype(np.int64)
    B, S, V = logits.shape
    rows = []  # (b, t, scored label, is target)
    for b in range(B):
        for t in range(S - 1):
            lab = labels[b, t + 1]
            rows.append((b, t, 0 if lab == IGN else lab, lab != IGN))
    delta, ce = [], []
    for b, t, lab, is_t in rows:
        z, zn = logits[b, t], logits_ni[b, t]
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        pn = np.exp(zn - zn.max()) / np.exp(zn - zn.max()).sum()
        delta.append(p[lab] - pn[lab] if kind == "cmo" else z[lab] - zn[lab])
        ce.append(-np.log(p[lab]) if is_t else 0.0)
    c = np.clip(np.array(delta), lo, hi)
    targets = np.array([r[3] for r in rows])

    def avg3(x):
        return np.array([x[max(i - 1, 0): i + 2].mean() for i in range(len(x))])

    if per_sequence:
        w = c.copy()
        for b in range(B):
            idx = [i for i, r in enumerate(rows) if r[0] == b and r[3]]
            if idx:
                w[idx] = avg3(c[idx])
    else:
        w = avg3(c)
    return float((w * np.array(ce)).sum() / (w[targets].sum() + 1e-6))


@pytest.mark.parametrize("kind", ["cmo", "cal"])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_numpy_reference(kind, per_sequence, seed):
    g = torch.Generator().manual_seed(seed)
    B, S, V = 3, 9, 7
    logits = torch.randn(B, S, V, generator=g) * 2
    logits_ni = logits + torch.randn(B, S, V, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < 0.4] = IGN
    labels[0, 1:] = torch.randint(0, V, (S - 1,), generator=g)  # at least one target
    lo, hi = (0.02, 0.3) if kind == "cmo" else (-0.5, 1.5)  # bounds that leave many deltas unclamped
    smoothing = "per_sequence" if per_sequence else "flat"
    if kind == "cmo":
        got = cmo_loss(logits, logits_ni, labels, delta_min=lo, delta_max=hi, smoothing=smoothing)
    else:
        got = cal_loss(logits, logits_ni, labels, clamp_min=lo, clamp_max=hi, smoothing=smoothing)
    exp = _np_reference(logits.numpy(), logits_ni.numpy(), labels.numpy(), kind, lo, hi, per_sequence)
    assert got.item() == pytest.approx(exp, rel=1e-5, abs=1e-6)


def test_chunking_does_not_change_the_loss():
    g = torch.Generator().manual_seed(3)
    logits, ni = torch.randn(2, 10, 13, generator=g), torch.randn(2, 10, 13, generator=g)
    labels = torch.randint(0, 13, (2, 10), generator=g)
    labels[:, :3] = IGN
    a = contrastive_loss(logits, ni, labels, LossConfig("cmo", delta_min=0.0, chunk_tokens=1024))
    b = contrastive_loss(logits, ni, labels, LossConfig("cmo", delta_min=0.0, chunk_tokens=3))
    assert a.item() == pytest.approx(b.item(), abs=1e-7)


def test_smooth_rejects_unknown_mode():
    with pytest.raises(ValueError):
        smooth(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), mode="bogus")


def test_stats_report_clamping():
    _, stats = contrastive_loss(_logits(P), _logits(Q), LABELS, LossConfig("cmo"), return_stats=True)
    # target deltas by hand: 0.3, 0.6, 0.1, 0.25 -> one at the upper bound, none at the lower
    assert stats["delta_mean"] == pytest.approx((0.3 + 0.6 + 0.1 + 0.25) / 4, abs=1e-6)
    assert stats["frac_at_max"] == pytest.approx(0.25)
    assert stats["frac_at_min"] == pytest.approx(0.0)
    assert stats["weight_mean"] == pytest.approx((W_FLAT[0] + W_FLAT[1] + W_FLAT[4] + W_FLAT[5]) / 4, abs=1e-6)


def test_padding_is_left_out_of_the_flat_stream():
    """With the attention mask, flat smoothing lays the sequences end to end without their padding:
    the hand example padded (row 0 on the left, row 1 on the right) gives the hand value again."""
    pad_p = [0.05, 0.9, 0.05]  # logits at a pad query
    pad_q = [0.9, 0.05, 0.05]
    p = [[pad_p] + P[0], P[1] + [pad_p]]
    q = [[pad_q] + Q[0], Q[1] + [pad_q]]
    labels = torch.tensor([[IGN, IGN, 1, 2, IGN], [IGN, IGN, 0, 1, IGN]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    cfg = LossConfig("cmo")
    got = contrastive_loss(_logits(p), _logits(q), labels, cfg, attention_mask=mask)
    assert got.item() == pytest.approx(_expected(dict(enumerate(W_FLAT))), abs=1e-6)
    # Without the mask the two padding cells take part, by hand:
    #   row 0 cell 0 (pad query, stand-in 0): 0.05 - 0.9 -> 0.05
    #   row 1 cell 3 (last token predicting the pad, stand-in 0): 0.01 - 0.98 -> 0.05
    # stream [0.05, 0.3, 0.5, 0.3 | 0.05, 0.1, 0.25, 0.05], targets at flat 1, 2, 5, 6
    w = {0: (0.05 + 0.3 + 0.5) / 3, 1: (0.3 + 0.5 + 0.3) / 3, 4: (0.05 + 0.1 + 0.25) / 3, 5: (0.1 + 0.25 + 0.05) / 3}
    unmasked = contrastive_loss(_logits(p), _logits(q), labels, cfg)
    assert unmasked.item() == pytest.approx(_expected(w), abs=1e-6)
    assert abs(unmasked.item() - got.item()) > 1e-3
    # An all-ones mask is the reference itself.
    full = contrastive_loss(_logits(P), _logits(Q), LABELS, cfg, attention_mask=torch.ones(2, 4, dtype=torch.long))
    assert full.item() == pytest.approx(_expected(dict(enumerate(W_FLAT))), abs=1e-6)
