"""No method sees a held-out prompt: every prompt any method encodes, in any mode, is recorded
and checked against the words only the held-out templates and the synonyms use."""
import pytest

import fasterase
from fasterase import models
from fasterase.toy import shapes


def held_out_words() -> set[str]:
    method_words = {w for t in shapes.TEMPLATES + shapes.SCENE_TEMPLATES for w in t.split()}
    only_held_out = {w for t in shapes.HELDOUT_TEMPLATES for w in t.split()} - method_words
    return only_held_out | {w for ws in shapes.SYNONYMS.values() for w in ws}


def test_the_held_out_words_are_what_the_templates_say():
    assert held_out_words() == {"an", "image", "picture", "disk", "box"}


FAST = {"uce": {}, "esd": {"steps": 2}, "ant": {"steps": 2, "batch_size": 2, "sample_steps": 4, "saliency_seeds": 1}}


@pytest.mark.parametrize("concepts", [["circle", "square"], ["red"]], ids=["two shapes", "colour"])
@pytest.mark.parametrize("method", sorted(FAST))
@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_no_method_receives_a_held_out_prompt(monkeypatch, name, method, concepts):
    seen = []
    encode = models.Denoiser.encode

    def recording(self, prompts):
        seen.extend([prompts] if isinstance(prompts, str) else prompts)
        return encode(self, prompts)

    monkeypatch.setattr(models.Denoiser, "encode", recording)
    options = {k: v for k, v in FAST[method].items() if len(concepts) == 1 or not k.startswith("saliency")}
    fasterase.erase(name, concepts, method=method, progress=False, **options)
    assert seen, "no prompt was recorded: the check would pass vacuously"
    assert any(c in p for p in seen for c in concepts)
    leaked = sorted({p for p in seen if held_out_words() & set(p.split())})
    assert not leaked, leaked
