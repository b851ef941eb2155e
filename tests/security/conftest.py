"""Security tier: the hostile corpus through the real service (the system tier's fixture)."""

from tests.system.conftest import make_service  # noqa: F401
