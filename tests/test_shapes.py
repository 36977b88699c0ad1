"""The toy world's generator and tokenizer."""
import numpy as np
import pytest

from fasterase.toy import components, shapes


def test_world_size():
    assert len(shapes.SHAPES) >= 5 and len(shapes.COLORS) >= 4
    assert sum(1 for s in shapes.SHAPES if shapes.SYNONYMS.get(s)) >= 2


def test_render_range_and_colour():
    rng = np.random.default_rng(0)
    img = shapes.render(["square"] * 4, ["red"] * 4, rng)
    assert img.shape == (4, 3, 32, 32) and img.dtype == np.float32
    assert img.min() >= -1 and img.max() <= 1
    # corners are white background, the centre is the red shape
    assert np.allclose(img[:, :, 0, 0], 1.0)
    centre = img[:, :, 16, 16]
    assert (centre[:, 0] > centre[:, 1] + 1).all()


def test_empty_background():
    img = shapes.render([None], [None], np.random.default_rng(0))
    assert np.allclose(img, 1.0)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_shapes_differ(shape):
    rng = np.random.default_rng(1)
    a = shapes.render([shape], ["blue"], rng)
    for other in shapes.SHAPES:
        if other != shape:
            b = shapes.render([other], ["blue"], np.random.default_rng(1))
            assert np.abs(a - b).mean() > 0.01, (shape, other)


def test_sample_is_deterministic_and_uses_synonyms():
    a = shapes.sample(200, np.random.default_rng(3))
    b = shapes.sample(200, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    caps = " ".join(a[1])
    assert "disk" in caps and "box" in caps
    assert "" in a[1]  # caption dropout for classifier-free guidance
    shape_words = set(shapes.SHAPES) | {w for ws in shapes.SYNONYMS.values() for w in ws}
    for img, cap, s, c in zip(*a):
        words = cap.split()
        if s < 0:  # a caption that names no shape shows none
            assert c < 0 and cap and not shape_words & set(words) and np.allclose(img, 1.0)
        elif cap:
            assert shapes.SHAPES[s] in words or any(w in words for w in shapes.SYNONYMS.get(shapes.SHAPES[s], ()))
    assert (a[2] < 0).any()


def test_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="valid"):
        shapes.render(["hexagon"], ["red"], np.random.default_rng(0))


def test_tokenizer():
    tok = components.tokenizer()
    ids = tok("A Red CIRCLE").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "circle"]
    assert tok("zebra").input_ids[1] == tok.unk_token_id
    padded = tok(["a disk"], padding="max_length", max_length=components.MAX_TOKENS).input_ids[0]
    assert len(padded) == components.MAX_TOKENS
