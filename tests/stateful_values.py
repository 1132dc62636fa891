"""A Stateful value the tests of how Stateful objects are saved and restored share."""

from __future__ import annotations

from typing import Any


class Holder:
    """A Stateful value whose state is whatever was last given or loaded."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state
