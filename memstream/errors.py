"""One exception hierarchy for all of memstream.

Every error a user can cause or fix derives from :class:`MemstreamError`, and its message
says what to do about it.
"""


class MemstreamError(Exception):
    """Base class of every error memstream raises on purpose."""


class ConfigError(MemstreamError):
    """A setting is missing or invalid."""


class ServiceError(MemstreamError):
    """A service that memstream starts or talks to (Kafka, S3, a Beam runner) failed."""


class ToolMissingError(ServiceError):
    """A program memstream needs (java, mvn, go) is not installed."""

    def __init__(self, tool: str, hint: str):
        self.tool = tool
        super().__init__(f"'{tool}' not found on PATH: {hint}")


class ServiceNotReadyError(ServiceError):
    """A service did not become ready in time; its log file says why."""
