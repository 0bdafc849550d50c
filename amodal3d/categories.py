"""The 13 ShapeNet categories of the benchmark, in the seed table's order."""

from __future__ import annotations

#: short names used in configs, file names and code (seed-table order)
CATEGORIES: tuple[str, ...] = (
    "airplane", "bench", "dresser", "car", "chair", "display", "lamp",
    "speaker", "rifle", "sofa", "table", "phone", "vessel",
)

#: column headers of the results table (the reference table of docs/design.md)
DISPLAY_NAMES: dict[str, str] = {
    "airplane": "Airplane", "bench": "Bench", "dresser": "Dresser", "car": "Car",
    "chair": "Chair", "display": "Display", "lamp": "Lamp", "speaker": "Speaker",
    "rifle": "Rifle", "sofa": "Sofa", "table": "Table", "phone": "Phone",
    "vessel": "Vessel",
}

#: ShapeNetCore synset ids
SYNSETS: dict[str, str] = {
    "airplane": "02691156", "bench": "02828884", "dresser": "02933112",
    "car": "02958343", "chair": "03001627", "display": "03211117",
    "lamp": "03636649", "speaker": "03691459", "rifle": "04090263",
    "sofa": "04256520", "table": "04379243", "phone": "04401088",
    "vessel": "04530566",
}

SYNSET_TO_CATEGORY: dict[str, str] = {v: k for k, v in SYNSETS.items()}

NUM_CATEGORIES = len(CATEGORIES)


def category_index(name: str) -> int:
    """Index of a category (short name or synset id) in CATEGORIES."""
    key = SYNSET_TO_CATEGORY.get(name, name)
    if key not in CATEGORIES:
        raise ValueError(
            f"unknown category {name!r}: expected one of {', '.join(CATEGORIES)} "
            "or their ShapeNet synset ids"
        )
    return CATEGORIES.index(key)


def resolve_categories(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Validate a category list from a config ("all"/None means all 13)."""
    if not names or list(names) == ["all"]:
        return list(CATEGORIES)
    return [CATEGORIES[category_index(n)] for n in names]
