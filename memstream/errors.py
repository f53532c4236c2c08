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


class IntegrityError(MemstreamError):
    """Stored or received data failed a cryptographic check: treat it as tampered with."""


class SignatureError(IntegrityError):
    """A signature does not verify, or its key id is not in the key ring."""


class VerificationError(IntegrityError):
    """A Merkle proof, tree head or stored row does not check out."""


class ReplayError(IntegrityError):
    """A signed write or request was already applied: sign a fresh one instead of resending."""


class AppendOnlyViolation(MemstreamError):
    """An update or delete was attempted on append-only storage."""


class GovernanceError(MemstreamError):
    """A governance action lacks the approvals its policy requires."""


class LeaseError(ServiceError):
    """A storage lease (the lock that keeps cleanup and writers apart) could not be taken."""
