"""System tier: the real `python -m daemon` as a subprocess; every service is killed at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.service import Service

MakeService = Callable[..., Service]


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[MakeService]:
    made: list[Service] = []

    def make(
        pipelines: list[dict[str, Any]], root: Path | None = None, **sections: dict[str, Any]
    ) -> Service:
        service = Service(root or tmp_path, pipelines, **sections)
        made.append(service)
        return service

    yield make
    for service in made:
        service.kill_all()
