"""The chaos suite runs in the network lab; its fixtures are the lab's."""

from tests.netlab.conftest import lab_prefix

__all__ = ["lab_prefix"]
