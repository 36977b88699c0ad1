"""Concepts and their prompt sets."""
import pytest

from fasterase.concepts import TEMPLATES, Concept, ConceptSet, as_concepts
from fasterase.errors import UserError
from fasterase.toy import concepts as toy_concepts
from fasterase.toy import shapes


def test_prompts_and_augmentation():
    c = Concept("circle", anchor="", templates=("a {}", "a photo of a {}"), attributes=("red", "blue"))
    assert c.prompts() == ["a circle", "a photo of a circle"]
    assert c.prompts(augment=True) == ["a circle", "a photo of a circle", "a red circle", "a photo of a red circle",
                                       "a blue circle", "a photo of a blue circle"]
    # each guide prompt is its prompt with the anchor in the concept's place
    assert c.anchor_prompts(augment=True)[3] == "a photo of a red"
    assert len(c.anchor_prompts(augment=True)) == len(c.prompts(augment=True))


def test_synonym_prompts():
    c = Concept("circle", synonyms=("disk",), templates=("a {}",))
    assert c.synonym_prompts() == ["a disk"]


@pytest.mark.parametrize("kwargs,match", [
    ({"name": ""}, "non-empty"),
    ({"name": "x", "type": "animal"}, "object, style, celebrity, nudity"),
    ({"name": "x", "templates": ()}, "no prompt templates"),
    ({"name": "x", "templates": ("no slot",)}, "exactly one"),
    ({"name": "circle, square"}, "commas separate concepts"),
    ({"name": "x", "templates": ("a photo of a {x} {}",)}, "exactly one '{}' and no other braces"),
    ({"name": "x", "templates": ("a {0}",)}, "no other braces"),
    ({"name": "x", "templates": ("a {",)}, "no other braces"),
    ({"name": "x", "pair_templates": ("{} and {:>3}",)}, "exactly two"),
    ({"name": "x", "synonyms": [1]}, "synonyms of concept 'x' must be texts"),
    ({"name": "x", "synonyms": None}, "synonyms of concept 'x' must be texts"),
])
def test_bad_concepts(kwargs, match):
    with pytest.raises(UserError, match=match):
        Concept(**kwargs)


def test_one_text_is_one_template_or_synonym():
    """A string was split into its characters: 'template 'a' must contain exactly one {}'."""
    c = Concept("circle", synonyms="disk", templates="a photo of a {}")
    assert c.synonyms == ("disk",) and c.prompts() == ["a photo of a circle"]


def test_concept_sets():
    cs = as_concepts(["circle", Concept("square")], preserve="star")
    assert cs.names == ["circle", "square"] and cs.preserve == ("star",)
    with pytest.raises(ValueError, match="duplicate"):
        as_concepts(["circle", "Circle"])
    with pytest.raises(ValueError, match="both erased and preserved"):
        as_concepts(["circle"], preserve=["circle"])
    with pytest.raises(UserError, match=r"duplicate preserved concept\(s\) \['star'\]"):
        as_concepts(["circle"], preserve=["star", "Star"])
    with pytest.raises(ValueError, match="empty"):
        ConceptSet(())
    with pytest.raises(UserError, match="a list"):
        as_concepts(None)
    with pytest.raises(UserError, match="str or Concept"):
        as_concepts(["circle", 3])
    with pytest.raises(UserError, match="preserved concepts"):
        as_concepts("circle", preserve=[Concept("star")])


def test_commas_separate_concepts():
    """One rule everywhere: a string with commas is several concepts, in a list too, and in preserve."""
    cs = as_concepts(["circle,  square", "star"], preserve="cross ,triangle")
    assert cs.names == ["circle", "square", "star"] and cs.preserve == ("cross", "triangle")
    assert as_concepts("circle, square").names == as_concepts(["circle", "square"]).names
    for bad in ("circle,", ",", "circle,,square"):
        with pytest.raises(UserError, match="empty"):
            as_concepts(bad)


def test_preserved_prompts_cover_every_concept_in_any_order():
    """They were built in the first concept's templates alone: the prior changed with the order the concepts came in."""
    a = Concept("circle", templates=("a {}", "a photo of a {}"), attributes=("red",))
    b = Concept("square", templates=("a {}", "a drawing of a {}"))
    forward, backward = (as_concepts(list(cs), preserve="star").preserve_prompts() for cs in ((a, b), (b, a)))
    assert sorted(forward) == sorted(backward) == ["a drawing of a star", "a photo of a red star", "a photo of a star",
                                                   "a red star", "a star"]  # each once
    shared = as_concepts([a, Concept("square", templates=a.templates, attributes=a.attributes)], preserve="star")
    assert shared.preserve_prompts() == shared.preserve_prompts(a) == ["a star", "a photo of a star", "a red star",
                                                                       "a photo of a red star"]


def test_preserved_scene_prompts_pair_each_kept_name_with_the_next():
    cs = as_concepts(Concept("dog", pair_templates=("a {} and a {}",), attributes=("big",)),
                     preserve=["horse", "cow", "cat", "pig"])
    scenes = cs.preserve_scene_prompts()
    assert sorted(scenes) == sorted(["a horse and a cow", "a cow and a horse", "a cow and a cat", "a cat and a cow",
                                     "a cat and a pig", "a pig and a cat", "a pig and a horse", "a horse and a pig"])
    assert not {"a horse and a cat", "a cow and a pig"} & set(scenes)  # not every pair: linear in the names
    reordered = as_concepts(cs.concepts[0], preserve=["pig", "horse", "cat", "cow"]).preserve_scene_prompts()
    assert reordered == scenes  # the pairs do not depend on the order the names come in
    two = as_concepts("dog", preserve=["horse", "cow"]).preserve_scene_prompts()
    assert len(two) == len(set(two)) == 2 * len(Concept("dog").pair_templates)  # the pair once, both orders
    assert as_concepts("dog", preserve="horse").preserve_scene_prompts() == []
    assert as_concepts("dog").preserve_scene_prompts() == []


def test_a_preserved_concept_is_never_one_an_erased_concept_names():
    with pytest.raises(UserError, match="both erased and preserved"):
        as_concepts("red circle", preserve="circle")


def test_toy_concepts():
    c = toy_concepts.concept("circle")
    assert c.synonyms == ("disk",) and "red" in c.attributes
    assert "a photo of a red circle" in c.prompts(augment=True)
    assert "disk" not in " ".join(c.prompts(augment=True))  # synonyms are held out
    assert toy_concepts.preserve_for(["circle", "star"]) == ["square", "triangle", "cross"]


def test_toy_shapes_named_and_default_preserve():
    assert toy_concepts.shapes_named("red circle") == ["circle"]
    assert toy_concepts.shapes_named("Disk") == ["circle"] and toy_concepts.shapes_named("red") == []
    assert toy_concepts.shapes_named("box star") == ["square", "star"]
    assert toy_concepts.preserve_for(["red circle"]) == ["square", "triangle", "cross", "star"]
    assert toy_concepts.preserve_for(["disk", "red"]) == ["square", "triangle", "cross", "star"]


def test_a_preserved_concept_never_holds_an_erased_one():
    with pytest.raises(UserError, match=r"\['red circle'\] are both erased and preserved"):
        as_concepts("circle", ["red circle", "square"])
    with pytest.raises(UserError, match=r"\['Circle Disk'\] are both"):
        as_concepts("disk circle", "Circle Disk")
    assert as_concepts("red circle", "blue square").preserve == ("blue square",)


def test_the_toy_world_erases_its_shapes_or_its_colours():
    toy_concepts.check_erasable(["circle", "red circle", "disk", "box"])
    toy_concepts.check_erasable(["red", "blue"])
    with pytest.raises(UserError, match=r"\['small', 'tiny'\] name no toy shape or colour.*circle, square.*red"):
        toy_concepts.check_erasable(["red", "circle", "small", "tiny"])
    with pytest.raises(UserError, match="mix shapes and colours"):
        toy_concepts.check_erasable(["red", "circle"])


def test_a_toy_colour_is_a_style_concept():
    c = toy_concepts.concept("red")
    assert c.type == "style" and not c.synonyms and not c.attributes
    assert "a photo of a red star" in c.prompts() and "a photo of a grey star" in c.anchor_prompts()
    assert len(c.prompts()) == len(shapes.TEMPLATES) * len(shapes.SHAPES)
    assert toy_concepts.concept("circle").type == "object"
    assert toy_concepts.preserve_for(["red", "blue"]) == ["green", "yellow"]
    assert toy_concepts.kind_of("red circle") == "shape" and toy_concepts.kind_of("red") == "color"
    assert toy_concepts.kind_of("red green") is None and toy_concepts.kind_of("small") is None
    assert toy_concepts.kind_of("grey") is None  # the neutral colour: the anchor, not a concept
    with pytest.raises(UserError, match="more than one shape.*commas"):
        toy_concepts.check_erasable(["circle square"])
    with pytest.raises(UserError, match="more than one colour.*commas"):
        toy_concepts.check_erasable(["red blue"])
    with pytest.raises(UserError, match="grey, the toy world's neutral colour.*cannot be erased"):
        toy_concepts.check_erasable(["grey"])
    assert toy_concepts.concept("red circle").attributes == ()  # no "a blue red circle"


def test_no_toy_concept_trains_on_held_out_prompts_or_synonyms():
    for bad in (Concept("circle"), Concept("circle", templates=("A Picture of a {}.",))):  # case, punctuation
        with pytest.raises(UserError, match="held-out prompt.*'a picture of a circle'"):
            toy_concepts.check_not_heldout([bad])
    for bad in (toy_concepts.concept("disk"), Concept("circle", templates=("a {} like a disk",))):
        with pytest.raises(UserError, match="synonym.*disk"):
            toy_concepts.check_not_heldout([bad])
    toy_concepts.check_not_heldout([toy_concepts.concept(n) for n in ("circle", "red", "red circle", "star")])


def test_default_templates_follow_the_type():
    assert Concept("dog").templates == TEMPLATES["object"] and "a photo of a dog" in Concept("dog").prompts()
    style = Concept("Van Gogh", type="style")
    assert style.templates == TEMPLATES["style"] and "a painting by Van Gogh" in style.prompts()
    assert "a portrait of Emma Watson" in Concept("Emma Watson", type="celebrity").prompts()
    assert Concept("Van Gogh", type="style", templates=("{} art",)).prompts() == ["Van Gogh art"]
    assert all(t.count("{}") == 1 for ts in TEMPLATES.values() for t in ts)


def test_a_concept_given_in_the_toy_world_by_name_and_type_alone_is_the_worlds():
    assert toy_concepts.completed(Concept("red", type="style")) == toy_concepts.concept("red")
    assert toy_concepts.completed(Concept("circle")) == toy_concepts.concept("circle")
    own = Concept("circle", anchor="square")
    assert toy_concepts.completed(own) is own
    for given, world in [(Concept("red"), "style"), (Concept("circle", type="style"), "object")]:
        with pytest.raises(UserError, match=f"is of type '{world}' in the toy world"):
            toy_concepts.completed(given)
