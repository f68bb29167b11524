"""Species of a class-conditional model: readable names, and finding one from what a user types."""

from __future__ import annotations

import difflib
import re

from .model_folder import BirdModel


class SpeciesError(ValueError):
    """A species a model does not know, or species given to a model that has none."""


def readable(folder_name: str) -> str:
    """'017.Cardinal' -> 'Cardinal'; '047.American_Goldfinch' -> 'American Goldfinch'."""
    return re.sub(r"^\d+\.", "", folder_name).replace("_", " ")


def species_names(model: BirdModel) -> list[str]:
    """Readable names by class index."""
    return [readable(name) for _, name in model.species or []]


def species_index(model: BirdModel, class_id: int | None) -> int | None:
    """The model's class index for a CUB class id, or None if it has no such species."""
    return next((i for i, (known, _) in enumerate(model.species or []) if known == class_id), None)


def require_species_model(model: BirdModel) -> None:
    if not model.conditional:
        raise SpeciesError(f"{model.name} is not a species model: it was trained without species labels and ignores"
                           " them (drop --species, or use a model trained with --conditional)")


def resolve_species(model: BirdModel, text: str) -> int:
    """The class index for a CUB class id ('17') or a name ('cardinal', 'American Goldfinch'),
    case-insensitive; an unknown one fails with the closest names."""
    require_species_model(model)
    text = str(text).strip()
    names = species_names(model)
    written = [i for i, (_, name) in enumerate(model.species) if name == text]  # a class folder's name as it is
    if written:
        return written[0]
    if text.isdigit():
        index = species_index(model, int(text))
        if index is not None:
            return index
        known = ", ".join(str(c) for c, _ in model.species[:5])
        raise SpeciesError(f"{model.class_word} id {text} is not one of the {len(names)} this model knows ({known}, …;"
                           " see `birdgen species`)")
    wanted = text.lower().replace("_", " ")
    exact = [i for i, name in enumerate(names) if name.lower() == wanted]
    partial = [i for i, name in enumerate(names) if wanted in name.lower()]
    if exact or len(partial) == 1:
        return (exact or partial)[0]
    if partial:
        raise SpeciesError(f"{model.class_word} {text!r} matches several: {', '.join(names[i] for i in partial[:8])}")
    close = difflib.get_close_matches(wanted, [n.lower() for n in names], n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(names[[n.lower() for n in names].index(c)]) for c in close)}?" if close \
        else "; see `birdgen species --model …`"
    raise SpeciesError(f"unknown {model.class_word} {text!r}{hint}")
