"""AMT's event metrics from per-token cross-entropy."""

import math

import numpy as np

from amtrain.modalities.midi import bits_per_event, event_metrics, event_perplexity


def test_event_perplexity_is_token_perplexity_cubed():
    ce = np.array([0.0, 0.5, 1.7, 3.0])
    np.testing.assert_allclose(event_perplexity(ce), np.exp(ce) ** 3, rtol=1e-12)
    assert event_perplexity(0.0) == 1.0


def test_bits_per_event():
    assert math.isclose(float(bits_per_event(math.log(2))), 3.0, rel_tol=1e-12)  # 1 bit per token
    np.testing.assert_allclose(bits_per_event([1.0, 2.0]), [3 / math.log(2), 6 / math.log(2)])
    # consistency: 2 ** bits == perplexity
    ce = 1.234
    assert math.isclose(2 ** float(bits_per_event(ce)), float(event_perplexity(ce)), rel_tol=1e-12)


def test_event_metrics_dict():
    m = event_metrics(1.0)
    assert set(m) == {"event_ppl", "bits_per_event"}
    assert math.isclose(m["event_ppl"], math.e ** 3)
