"""Tally's Python client, metadata helper, provider instrumentation and command line.

from tally_client import TallyClient, create_headers, create_metadata
"""

from ._calls import EventFilter, UnitCounts, Units, money, new_limit as limit, new_outcome as outcome, usage_event
from .client import AsyncTallyClient, ExperienceScope, TallyClient
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    ResourceExhausted,
    TallyError,
    Unavailable,
)
from .metadata import Metadata, create_headers, create_metadata
from .output import dollars

__all__ = [
    "AlreadyExists",
    "AsyncTallyClient",
    "EventFilter",
    "ExperienceScope",
    "FailedPrecondition",
    "InvalidArgument",
    "LimitExceeded",
    "Metadata",
    "NotFound",
    "ResourceExhausted",
    "TallyClient",
    "TallyError",
    "Unavailable",
    "UnitCounts",
    "Units",
    "create_headers",
    "create_metadata",
    "dollars",
    "limit",
    "money",
    "outcome",
    "usage_event",
]
