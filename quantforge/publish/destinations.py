"""The publisher for a destination (`publish.to`, parsed once into a Destination):

    hub        the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN / hf auth login)       (publish/hub.py)
    dir:PATH   a folder laid out like Hub repos: PATH/<namespace>/<repo>/...   (publish/localdir.py)
"""

from __future__ import annotations

from ..config.destination import Destination
from ..core.step import Step
from .publisher import Publisher


def publisher_for(to: Destination | str) -> Publisher:
    where = to if isinstance(to, Destination) else Destination.parse(to)
    if where.folder is None:
        from .hub import HubPublisher

        return HubPublisher()
    from .localdir import LocalDirPublisher

    return LocalDirPublisher(where.folder)


def destination(step: Step) -> Destination:
    """Where a publish step publishes on this machine: the Hub, or a folder resolved against the targets file."""
    where = step.local.get("to")
    return where if isinstance(where, Destination) else Destination.parse(step.params["to"])
