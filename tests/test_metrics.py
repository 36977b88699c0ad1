"""Erasure metrics on hand-made cases."""
import pytest

from fasterase.eval.metrics import erasure_metrics, harmonic_mean


def per(**accs):
    return {k: {"acc": v[0], "acc_synonyms": v[1], "acc_color": 1.0} for k, v in accs.items()}


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])


def test_single_erasure():
    m = erasure_metrics(per(circle=(0.1, 0.2), square=(0.9, 0.8), star=(0.7, None)), ["circle"])
    assert m["acc_e"] == pytest.approx(0.1)
    assert m["acc_g"] == pytest.approx(0.2)
    assert m["acc_s"] == pytest.approx(0.8)
    assert m["H"] == pytest.approx(3 / (1 / 0.9 + 1 / 0.8 + 1 / 0.8))


def test_color_s_is_the_kept_concepts_colour_accuracy():
    accs = per(circle=(0.0, 0.0), square=(1.0, 1.0), star=(1.0, None))
    accs["circle"]["acc_color"], accs["square"]["acc_color"], accs["star"]["acc_color"] = 0.0, 0.5, 0.75
    assert erasure_metrics(accs, ["circle"])["color_s"] == pytest.approx(0.625)


def test_multi_erasure_and_missing_synonyms():
    m = erasure_metrics(per(circle=(0.2, 0.4), star=(0.0, None), square=(1.0, 1.0)), ["circle", "star"])
    assert m["acc_e"] == pytest.approx(0.1)
    assert m["acc_g"] == pytest.approx(0.4)  # only circle has synonyms
    assert m["acc_s"] == pytest.approx(1.0)
    m = erasure_metrics(per(star=(0.0, None), square=(0.5, 1.0)), ["star"])
    assert m["acc_g"] is None and m["H"] == pytest.approx(harmonic_mean([1.0, 0.5]))


def test_perfect_and_failed_erasure():
    assert erasure_metrics(per(circle=(0.0, 0.0), square=(1.0, None)), ["circle"])["H"] == 1.0
    assert erasure_metrics(per(circle=(1.0, 0.0), square=(1.0, None)), ["circle"])["H"] == 0.0


def test_errors():
    with pytest.raises(ValueError, match="valid"):
        erasure_metrics(per(circle=(0.0, 0.0)), ["hexagon"])
    with pytest.raises(ValueError):
        erasure_metrics(per(circle=(0.0, 0.0)), [])


def test_every_concept_erased():
    """Erasing every concept is an edit erase can make: Acc_s and Col_s are undefined, H has the rest."""
    m = erasure_metrics(per(circle=(0.25, 0.5)), ["circle"])
    assert m["acc_s"] is None and m["color_s"] is None
    assert m["H"] == pytest.approx(harmonic_mean([0.75, 0.5]))
