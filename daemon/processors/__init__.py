"""Processor registry: kind → "module:attr", the built-ins plus entry points `medbatch.processors`.

Lookups import nothing heavy: option models of the built-ins live in `options.py`, and processor
modules are imported only by `load_processor`, which runs in the worker.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Any, cast

from pydantic import BaseModel

from daemon.errors import UnknownProcessorError
from daemon.processors.base import Processor

ENTRY_POINT_GROUP = "medbatch.processors"

BUILTIN: dict[str, str] = {
    "emr": "daemon.processors.emr:EmrProcessor",
    "imaging": "daemon.processors.imaging:ImagingProcessor",
    "genomics": "daemon.processors.genomics:GenomicsProcessor",
}
BUILTIN_OPTIONS: dict[str, str] = {
    "emr": "daemon.processors.options:EmrOptions",
    "imaging": "daemon.processors.options:ImagingOptions",
    "genomics": "daemon.processors.options:GenomicsOptions",
}


def import_from_string(ref: str) -> Any:
    """Import ``"package.module:attr"``."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UnknownProcessorError(f'import string "{ref}" must be in the form "module:attr"')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownProcessorError(f'could not import module "{module_name}": {exc}') from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UnknownProcessorError(f'module "{module_name}" has no attribute "{attr}"') from None


@cache
def registry() -> dict[str, str]:
    """Every known kind and where its processor lives; built-ins win over plugins."""
    kinds = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    kinds.update(BUILTIN)
    return kinds


def known_kinds() -> list[str]:
    return sorted(registry())


def _ref(kind: str) -> str:
    try:
        return registry()[kind]
    except KeyError:
        known = ", ".join(known_kinds())
        raise UnknownProcessorError(f'unknown kind "{kind}" (known: {known})') from None


def options_model(kind: str) -> type[BaseModel]:
    """The pydantic model of a kind's options (a plugin's comes from its class's `Options`)."""
    if kind in BUILTIN_OPTIONS:
        return cast(type[BaseModel], import_from_string(BUILTIN_OPTIONS[kind]))
    return load_processor(kind).Options


def load_processor(kind: str) -> type[Processor]:
    return cast(type[Processor], import_from_string(_ref(kind)))
