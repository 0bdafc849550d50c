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


def display_name(name: str) -> str:
    """A table header for a category: the seed table's for the 13, else the name title-cased."""
    return DISPLAY_NAMES.get(name, name.replace("_", " ").strip().title() or name)


def manifest_categories(manifest: dict) -> list[str]:
    """The category table of a built dataset: its shards' `category` field indexes it
    (`all_categories`; datasets without it hold the 13 ShapeNet categories)."""
    return [str(c) for c in (manifest.get("all_categories") or CATEGORIES)]


def class_names(cfg) -> tuple[str, ...]:
    """The category table a run or a bench works with: cfg.data.class_names, filled from the
    dataset's manifest (resolve_class_names); empty (configs and checkpoints from before the
    key, datasets of the 13) means CATEGORIES."""
    data = getattr(cfg, "data", cfg)
    names = getattr(data, "class_names", None) or ()
    return tuple(str(n) for n in names) or CATEGORIES


def resolve_class_names(cfg, manifest: dict) -> tuple[str, ...]:
    """Set cfg.data.class_names from a dataset's manifest (the 13 ShapeNet categories stay empty,
    so configs of synth13/nmr/shapenet runs read as before); returns the table."""
    names = manifest_categories(manifest)
    cfg.data.class_names = [] if tuple(names) == CATEGORIES else names
    return class_names(cfg)


def check_class_names(checkpoint, trained, dataset, data_root: str = "") -> None:
    """A checkpoint only means something on the category table it was trained on: its class
    indices (detector heads, per-category templates, metric rows) are positions in that table,
    so on a dataset with another table they would silently score the wrong categories.
    Raises ConfigError naming the checkpoint, both tables and what to do."""
    from amodal3d.errors import ConfigError

    trained, dataset = tuple(trained), tuple(dataset)
    if trained == dataset:
        return
    where = f" ({data_root})" if data_root else ""
    raise ConfigError(
        f"{checkpoint}: trained on {len(trained)} categories [{', '.join(trained)}], but the dataset{where} has "
        f"{len(dataset)} [{', '.join(dataset)}]; score or use it on the dataset it was trained on (data.root of "
        "its run's config.yaml), or retrain it on this dataset"
    )
