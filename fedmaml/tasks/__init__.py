"""Data sources -> clients -> episodes (support/query)."""

from fedmaml.tasks.episodes import Batch, ClientData, EpisodeSpec, Task, sample_episode

__all__ = ["Batch", "ClientData", "EpisodeSpec", "Task", "sample_episode"]
