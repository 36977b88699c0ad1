"""Concept prompts paired with the same prompts without the concept: FADE's P_c / P_-c and TRACE's
concept prompts / their replacement in the target trajectory."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..concepts import ConceptSet


@dataclass
class PromptPairs:
    """Every prompt of a run: concept prompts (with their concept index), their neutral pairs, and
    the preserved prompts."""

    concept: list[tuple[str, int]]
    neutral: list[str]  # neutral[i] pairs concept[i]
    preserved: list[str]


def prompt_pairs(concepts: ConceptSet, neutral: str | None) -> PromptPairs:
    """Each concept's prompts (templates and attributes, never its synonyms), and the same prompts
    with the name replaced by `neutral` ("" removes it), or when it is None by the preserved
    concepts' names in turn (the toy world: the other shapes, or the other colours), or with
    nothing preserved by the concept's anchor.

    Why the preserved names by default: a concept's removal then stands against another concept
    drawn in its place, not against an empty scene. Against the empty prompts (toy-sd circle,
    bench/RESULTS.md) FADE's discriminator learned "a coloured object is there", and fooling it
    faded the colour of every shape."""
    concept, paired = [], []
    for k, c in enumerate(concepts):
        words = [neutral] if neutral is not None else list(concepts.preserve) or [c.anchor]
        prompts = c.prompts(augment=True)
        concept += [(p, k) for p in prompts]
        for i in range(len(prompts)):  # prompt i with the i-th word in turn, same template and attribute
            paired.append(dataclasses.replace(c, anchor=words[i % len(words)]).anchor_prompts(augment=True)[i])
    preserved = concepts.preserve_prompts()
    return PromptPairs(concept, paired, preserved)
