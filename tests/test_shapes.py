"""The toy world's generator and tokenizer."""
import numpy as np
import pytest

from fasterase.toy import components, shapes


def test_world_size():
    assert len(shapes.SHAPES) >= 5 and len(shapes.COLORS) >= 4
    assert sum(1 for s in shapes.SHAPES if shapes.SYNONYMS.get(s)) >= 2


def test_render_range_and_colour():
    rng = np.random.default_rng(0)
    img = shapes.render([[("square", "red")]] * 4, rng)
    assert img.shape == (4, 3, shapes.HEIGHT, shapes.WIDTH) and img.dtype == np.float32
    assert img.min() >= -1 and img.max() <= 1
    # corners are white background, the centre is the red shape
    assert np.allclose(img[:, :, 0, 0], 1.0)
    centre = img[:, :, shapes.HEIGHT // 2, shapes.WIDTH // 2]
    assert (centre[:, 0] > centre[:, 1] + 1).all()


def test_a_scene_puts_the_first_object_on_the_left():
    img = shapes.render([[("circle", "red"), ("square", "blue")]] * 3, np.random.default_rng(1))
    left, right = img[:, :, :, : shapes.WIDTH // 2], img[:, :, :, shapes.WIDTH // 2:]
    # red (R high, B low) only on the left; blue only on the right; the middle column is background
    assert ((left[:, 0] > 0.5) & (left[:, 2] < -0.3)).any(axis=(1, 2)).all()
    assert not ((right[:, 0] > 0.5) & (right[:, 2] < -0.3)).any()
    assert ((right[:, 2] > 0.5) & (right[:, 0] < -0.3)).any(axis=(1, 2)).all()
    assert np.allclose(img[:, :, :, shapes.WIDTH // 2], 1.0)


def test_neutral_colour_is_grey_and_empty_background():
    grey = shapes.render([[("circle", shapes.NEUTRAL_COLOR)]], np.random.default_rng(0))[0, :, 16, 24]
    assert np.ptp(grey) < 0.25 and -0.3 < grey.mean() < 0.0
    assert np.allclose(shapes.render([[]], np.random.default_rng(0)), 1.0)
    with pytest.raises(ValueError, match="at most two"):
        shapes.render([[("circle", "red")] * 3], np.random.default_rng(0))


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_shapes_differ(shape):
    a = shapes.render([[(shape, "blue")]], np.random.default_rng(1))
    for other in shapes.SHAPES:
        if other != shape:
            b = shapes.render([[(other, "blue")]], np.random.default_rng(1))
            assert np.abs(a - b).mean() > 0.01, (shape, other)


def test_sample_is_deterministic_and_its_captions_name_what_is_drawn():
    a = shapes.sample(400, np.random.default_rng(3))
    b = shapes.sample(400, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    caps = " ".join(a[1])
    assert "disk" in caps and "box" in caps and " and a " in caps and "next to" in caps
    assert "" in a[1]  # caption dropout for classifier-free guidance
    words_of = {s: {s, *shapes.SYNONYMS.get(s, ())} for s in shapes.SHAPES}
    shape_words = set().union(*words_of.values())
    counts = {0: 0, 1: 0, 2: 0}
    unnamed = set()  # the colours drawn for objects whose caption names no colour
    for img, cap, scene in zip(*a):
        counts[len(scene)] += 1
        words = cap.split()
        if not scene:  # a caption that names no shape shows none
            assert cap and not shape_words & set(words) and np.allclose(img, 1.0)
        elif cap:
            named = [w for w in words if w in shape_words]
            assert [next(s for s in shapes.SHAPES if w in words_of[s]) for w in named] == [s for s, _ in scene]
            for s, c in scene:  # the colour named before each shape word, or any colour when none is
                i = next(i for i, w in enumerate(words) if w in words_of[s])
                if words[i - 1] in shapes.COLOR_CLASSES:
                    assert words[i - 1] == c
                else:
                    unnamed.add(c)
    assert all(counts[k] > 20 for k in counts)
    assert unnamed == set(shapes.COLOR_CLASSES) and shapes.NEUTRAL_COLOR in caps.split()
    present, color = shapes.labels(a[2])
    assert present.shape == color.shape == (400, len(shapes.SHAPES))
    assert ((color >= 0) == (present > 0)).all() and (present.sum(1) == [len(s) for s in a[2]]).all()


def test_held_out_templates_are_their_own():
    assert not set(shapes.TEMPLATES) & set(shapes.HELDOUT_TEMPLATES)
    for t in shapes.TEMPLATES + shapes.HELDOUT_TEMPLATES:
        assert "{shape}" in t and "{color}" in t
    for t in shapes.SCENE_TEMPLATES:
        assert t.index("{first}") < t.index("{second}")


def test_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="valid"):
        shapes.render([[("hexagon", "red")]], np.random.default_rng(0))


def test_tokenizer():
    tok = components.tokenizer()
    ids = tok("A Red CIRCLE").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "circle"]
    assert tok("zebra").input_ids[1] == tok.unk_token_id
    padded = tok(["a disk"], padding="max_length", max_length=components.MAX_TOKENS).input_ids[0]
    assert len(padded) == components.MAX_TOKENS
