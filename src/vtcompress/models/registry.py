"""The registry of model families: :func:`register_adapter`, :func:`adapter_for`, :func:`list_families`.

The built-in families are the files ``models/<family>.py`` (each registers its description at import);
a third-party package adds a family through the entry point group ``vtcompress.models``, whose entries
point at a :class:`~vtcompress.models.description.ModelDescription` subclass or instance (or a module
that registers one when imported)::

    [project.entry-points."vtcompress.models"]
    my_vlm = "my_package.vtcompress_family:MyVLMDescription"
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from torch import nn

from .description import ModelDescription, PositionScheme, TextModelDescription

__all__ = [
    "ENTRY_POINT_GROUP",
    "MACHINERY",
    "builtin_family_modules",
    "FamilyInfo",
    "register_adapter",
    "register_family",
    "adapter_for",
    "description_for",
    "description_for_config",
    "supported_families",
    "list_families",
]

#: the entry point group third-party families register under
ENTRY_POINT_GROUP = "vtcompress.models"
#: the modules of ``vtcompress.models`` that are machinery, not a family; every other module there is a family file
#: (``models/<family>.py``), imported on first use so that it registers its description: adding a family is one file
MACHINERY = frozenset({"apply", "context", "decoder", "description", "encoder", "handle", "layout", "pipeline",
                       "registry", "sequence", "signals", "stats"})
#: the families that come first in lookups (the rest follow in name order)
_FIRST = ("llava", "llava_next", "onevision", "qwen2_vl", "internvl")

_FAMILIES: list[ModelDescription] = []
_SOURCES: dict[int, str] = {}
_LOCK = threading.RLock()
_LOADED = False
_TEXT = TextModelDescription()


@dataclass(frozen=True)
class FamilyInfo:
    """One registered family, as :func:`list_families` reports it.

    Attributes:
        family: its name.
        model_classes: the top-level model classes it serves.
        status: ``"supported"`` or ``"experimental"`` (the description's ``status``).
        modalities: the visual inputs it describes (``("image",)``, ``("image", "video")``).
        position_scheme: the LLM's positions (``"1d"``, ``"mrope"``).
        encoder_stage: encoder-stage (inside the tower) methods flow through its feature path.
        video_stage: its videos go through the projector stage (spatial methods frame by frame, temporal methods
            across frames).
        frames_as_images: its processor gives a video to the model as frames among the images (InternVL): temporal
            methods find them with ``apply(..., processor=)``.
        source: ``"builtin"`` or ``"entry point <name>"`` or ``"register_adapter"``.
    """

    family: str
    model_classes: tuple[str, ...]
    status: str
    modalities: tuple[str, ...]
    position_scheme: str
    encoder_stage: bool
    source: str
    video_stage: bool = False
    frames_as_images: bool = False


def register_adapter(description: ModelDescription | type[ModelDescription], *, source: str = "register_adapter"):
    """Register a family's description (an instance, or a subclass to instantiate); returns it.

    A family registered again (same ``family`` name) replaces the earlier one, so a module imported twice (or a
    third-party package overriding a built-in family on purpose) leaves one entry."""
    if isinstance(description, type):
        description = description()
    if not isinstance(description, ModelDescription):
        raise ValueError(f"register_adapter takes a ModelDescription (or subclass); got {type(description).__name__}")
    if not description.family or not description.model_classes:
        raise ValueError(f"{type(description).__name__} must set family and model_classes")
    for name in ("position_scheme", "vision_position_scheme"):  # a plain string ("mrope") becomes the enum
        value = getattr(description, name)
        try:
            setattr(description, name, PositionScheme(value))
        except ValueError:
            raise ValueError(f"{type(description).__name__}.{name}={value!r}; allowed: "
                             f"{', '.join(repr(p.value) for p in PositionScheme)}") from None
    with _LOCK:
        for i, d in enumerate(_FAMILIES):
            if d.family == description.family:
                _FAMILIES[i] = description
                break
        else:
            _FAMILIES.append(description)
        _SOURCES[id(description)] = source
    return description


#: the same, under the description's name
register_family = register_adapter


def builtin_family_modules() -> list[str]:
    """The family files of this package (``vtcompress.models.<name>``, every module not in :data:`MACHINERY`)."""
    import pkgutil

    from . import __path__ as here

    found = sorted(m.name for m in pkgutil.iter_modules(here) if not m.name.startswith("_") and m.name not in MACHINERY)
    return [n for n in _FIRST if n in found] + [n for n in found if n not in _FIRST]


def _entry_points():
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def _load() -> None:
    """Import the built-in families, then the entry points of the ``vtcompress.models`` group (once)."""
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        for name in builtin_family_modules():
            module = importlib.import_module(f"{__package__}.{name}")
            # a family file registers its description when first imported; one imported before (a registry
            # loaded again) is registered from the descriptions it defines
            known = {d.family for d in _FAMILIES}
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, ModelDescription) and obj.__module__ == module.__name__ \
                        and obj.family and obj.model_classes and obj.family not in known:
                    register_adapter(obj)
                    known.add(obj.family)
        for d in _FAMILIES:
            _SOURCES[id(d)] = "builtin"
        _LOADED = True  # before the plugins: a plugin may import vtcompress.models and look families up
        for ep in _entry_points():
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin names itself instead of breaking every model
                raise ValueError(f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                                 f"{type(e).__name__}: {e}") from e
            if isinstance(obj, ModelDescription) or (isinstance(obj, type) and issubclass(obj, ModelDescription)):
                register_adapter(obj, source=f"entry point {ep.name}")
            # a module that registered its family when imported needs nothing more


def supported_families() -> list[str]:
    """The names of the registered families, in registration order."""
    _load()
    return [d.family for d in _FAMILIES]


def list_families() -> list[FamilyInfo]:
    """Every registered family with its status (:class:`FamilyInfo`)."""
    _load()
    return [FamilyInfo(family=d.family, model_classes=tuple(d.model_classes), status=d.status,
                       modalities=tuple(m.name for m in d.modalities), position_scheme=str(d.position_scheme.value),
                       encoder_stage=bool(d.supports_encoder_stage()), source=_SOURCES.get(id(d), "register_adapter"),
                       video_stage=bool(d.video_projector_stage or d.frames_as_images),
                       frames_as_images=bool(d.frames_as_images))
            for d in _FAMILIES]


def adapter_for(model: nn.Module) -> ModelDescription:
    """The description of ``model``'s family; ``ValueError`` listing the supported families otherwise.

    The family serving the most specific class of the model wins (a third-party family for a subclass of a stock
    model is chosen over the stock model's family); among equals, the first registered."""
    _load()
    best, depth = None, None
    for d in _FAMILIES:
        k = d.match_depth(model)
        if k is None and d.matches(model):  # a family with its own matching rule: after the class matches
            k = len(type(model).__mro__)
        if k is not None and (depth is None or k < depth):
            best, depth = d, k
    if best is not None:
        return best
    names = "; ".join(f"{d.family} ({', '.join(d.model_classes)})" for d in _FAMILIES)
    raise ValueError(f"unsupported model {type(model).__name__}; supported families: {names}")


def description_for(model: nn.Module, *, text_only: bool = False) -> ModelDescription:
    """:func:`adapter_for`; with ``text_only=True`` a plain causal LM (no family) gets the text-only description
    (its decoder, for decoder-stage methods)."""
    try:
        return adapter_for(model)
    except ValueError:
        if text_only and _TEXT.matches(model):
            return _TEXT
        raise


def description_for_config(config) -> ModelDescription:
    """The description of the family whose models have ``config.model_type``; ``ValueError`` otherwise."""
    _load()
    for d in _FAMILIES:
        if d.matches_config(config):
            return d
    types = ", ".join(t for d in _FAMILIES for t in d.model_types)
    raise ValueError(f"no model family has model_type {getattr(config, 'model_type', type(config).__name__)!r}; "
                     f"known model types: {types}")
