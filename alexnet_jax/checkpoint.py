"""Orbax checkpoints of the TrainState in `<workdir>/checkpoints`: save, keep, auto-resume.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
in the middle of a save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the TrainState as the single item."""

    def __init__(self, workdir: str, *, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves a host-side (unreplicated) state; returns once the write is under way."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores `step` (default: the latest) into the structure of `abstract_state`."""
        step = self._manager.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
