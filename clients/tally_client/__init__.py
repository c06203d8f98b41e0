"""Tally's Python client, metadata helper, provider instrumentation and command line.

    from tally_client import TallyClient, create_metadata
"""

from .client import AsyncTallyClient, ExperienceScope, TallyClient, usage_event
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, TallyError, Unavailable
from .metadata import create_metadata
from .output import dollars

__all__ = [
    "AlreadyExists",
    "AsyncTallyClient",
    "ExperienceScope",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "TallyClient",
    "TallyError",
    "Unavailable",
    "create_metadata",
    "dollars",
    "usage_event",
]
