"""Erasure metrics on hand-made cases."""
import pytest

from fasterase.eval.metrics import erasure_metrics, harmonic_mean


def per(**accs):
    return {k: {"acc": v[0], "acc_heldout": v[0], "acc_synonyms": v[1], "acc_color": 1.0} for k, v in accs.items()}


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


# --- item-level arithmetic: per-concept accuracies and scenes ---------------------------------

from fasterase.eval.metrics import Item, concept_accuracies, scene_metrics  # noqa: E402


def item(kind, *objects, found):
    return Item(tuple(objects), kind, found)


def test_concept_accuracies_of_shapes_and_colours():
    items = [
        item("plain", ("circle", "red"), found={"circle": "red"}),
        item("plain", ("circle", "blue"), found={"circle": "grey"}),  # shape right, colour wrong
        item("plain", ("square", "red"), found={}),  # nothing drawn
        item("plain", ("square", "blue"), found={"square": "blue", "circle": "blue"}),
        item("heldout", ("circle", "red"), found={}),
        item("heldout", ("circle", "blue"), found={"circle": "blue"}),
        item("synonym", ("circle", "red"), found={"circle": "red"}),
    ]
    acc = concept_accuracies(items, ["circle", "square", "red", "blue"])
    assert acc["circle"] == {"acc": 1.0, "acc_heldout": 0.5, "acc_synonyms": 1.0, "acc_color": 0.5}
    assert acc["square"] == {"acc": 0.5, "acc_heldout": None, "acc_synonyms": None, "acc_color": 0.5}
    # a colour is shown where the named shape is drawn in it: red 1 of 2 plain, 0 of 1 held-out
    assert acc["red"] == {"acc": 0.5, "acc_heldout": 0.0, "acc_synonyms": None}
    assert acc["blue"] == {"acc": 0.5, "acc_heldout": 1.0, "acc_synonyms": None}
    # with the circle erased, a colour is scored on the other shapes alone: red 0 of 1, blue 1 of 1
    acc = concept_accuracies(items, ["circle", "red", "blue"], erased=["circle"])
    assert acc["red"]["acc"] == 0.0 and acc["blue"]["acc"] == 1.0 and acc["blue"]["acc_heldout"] is None
    assert acc["circle"]["acc"] == 1.0  # the erased shape itself is scored as before


def test_scene_metrics():
    items = [
        item("scene", ("circle", "red"), ("square", "blue"), found={"circle": "red", "square": "blue"}),
        item("scene", ("square", "red"), ("circle", "blue"), found={"circle": "blue"}),
        item("scene", ("star", "red"), ("cross", "green"), found={"star": "red", "cross": "green"}),
        item("scene", ("star", "green"), ("triangle", "green"), found={"star": "green"}),
        item("scene", ("triangle", "red"), ("cross", "blue"), found={"cross": "blue", "triangle": "red"}),
        item("plain", ("circle", "red"), found={}),  # not a scene: ignored
    ]
    assert scene_metrics(items) == {"acc_both": pytest.approx(3 / 5)}
    m = scene_metrics(items, ["circle"])
    # no circle: star+cross, star+triangle, triangle+cross -> 2 of 3 with both
    assert m["acc_both"] == pytest.approx(2 / 3)
    # circle with a kept shape: circle shown in both; the other shape in 1 of 2
    assert m["acc_e_scene"] == 1.0 and m["acc_s_scene"] == 0.5 and "acc_e_pair" not in m
    m = scene_metrics(items, ["circle", "square"])
    assert m["acc_e_pair"] == 1.0 and m["acc_e_scene"] is None and m["acc_both"] == pytest.approx(2 / 3)
    m = scene_metrics(items, ["star", "triangle"])
    # pairs: star+triangle (star shown); one erased: star+cross, triangle+cross -> both shown, cross kept
    assert m["acc_e_pair"] == 1.0 and m["acc_e_scene"] == 1.0 and m["acc_s_scene"] == 1.0
    assert m["acc_both"] == pytest.approx(1 / 2)


def test_scene_metrics_of_a_colour():
    items = [
        item("scene", ("circle", "red"), ("square", "blue"), found={"circle": "grey", "square": "blue"}),
        item("scene", ("star", "green"), ("cross", "red"), found={"star": "green", "cross": "red"}),
        item("scene", ("star", "red"), ("cross", "red"), found={"star": "red"}),  # both red: neither set
        item("scene", ("star", "green"), ("cross", "blue"), found={"star": "green"}),
    ]
    m = scene_metrics(items, ["red"])
    assert m["acc_e_scene"] == 0.5  # the red object drawn red in one of two
    assert m["acc_s_scene"] == 1.0 and m["acc_both"] == 0.0 and "acc_e_pair" not in m


def colour_per():
    out = per(circle=(1.0, 0.5), square=(0.5, None))
    for c, a in (("red", 0.25), ("blue", 0.75), ("green", 1.0)):
        out[c] = {"acc": a, "acc_heldout": a / 2, "acc_synonyms": None}
    return out


def test_erasing_a_colour_keeps_every_shape_and_the_other_colours():
    m = erasure_metrics(colour_per(), ["red"])
    assert m["acc_e"] == 0.25 and m["acc_e_heldout"] == 0.125 and m["acc_g"] is None
    assert m["acc_s"] == pytest.approx((1.0 + 0.5 + 0.75 + 1.0) / 4)
    assert m["color_s"] is None and m["H"] == pytest.approx(harmonic_mean([0.75, m["acc_s"]]))
    m = erasure_metrics(colour_per(), ["circle"])  # a shape erased: Acc_s counts the other shapes alone
    assert m["acc_s"] == 0.5 and m["acc_e_heldout"] == 1.0
    with pytest.raises(ValueError, match="mix shapes and colours"):
        erasure_metrics(colour_per(), ["red", "circle"])
