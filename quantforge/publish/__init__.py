"""Publishing verified artifacts: the package's face, holding no logic. The publish step and the card
(publication.py); the publishers' contract (publisher.py), one per destination (destinations.py: hub.py,
localdir.py); what a destination records and holds (published.py, copies.py); each artifact's upload to the Hub
ahead of the commit (upload.py); what quantforge.json keeps (record.py). Which files an artifact puts in its
repo, and what its card says, the artifact's format decides (looked up in the format registry, never imported
here). No module of the package imports this face back.
"""

from __future__ import annotations

from ..card import CARD_FILE
from .destinations import destination, publisher_for
from .publication import (
    _refuse_local_paths,
    publish_step,
    release_warnings,
    render_card,
    run_publish,
)
from .published import forget_published, published_record, unlisted_files, unlisted_warnings
from .publisher import Publisher, PublishResult
from .record import REPO_MANIFEST, public_data

__all__ = [
    "CARD_FILE",
    "REPO_MANIFEST",
    "PublishResult",
    "Publisher",
    "_refuse_local_paths",
    "destination",
    "forget_published",
    "public_data",
    "publish_step",
    "published_record",
    "publisher_for",
    "release_warnings",
    "render_card",
    "run_publish",
    "unlisted_files",
    "unlisted_warnings",
]
