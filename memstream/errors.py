"""One exception hierarchy for all of memstream.

Every error a user can cause or fix derives from :class:`MemstreamError`, and its message
says what to do about it::

    MemstreamError
    ├── ConfigError                  a setting is missing or invalid
    │   ├── TopicMissingError
    │   ├── ChunkLimitError
    │   ├── CheckpointError          a compressor checkpoint is missing or does not fit
    │   ├── KeyPermissionError       a private key file others than its owner may read
    │   ├── KeyRoleError             a key used in another role than its own, or in two
    │   └── KafkaSecurityError       Kafka SASL/TLS settings that do not fit together, or a missing file
    ├── ServiceError                 Kafka, S3, a Beam runner or a tool failed
    │   ├── ToolMissingError
    │   ├── ServiceNotReadyError
    │   ├── PublishError
    │   ├── KafkaAuthenticationError  the broker refused the login, or the TLS handshake failed
    │   ├── LeaseError
    │   ├── FencedError              a newer holder took over: a pipeline instance, a lease
    │   ├── StateLostError           the runner lost keyed state: the bundle fails, not the windows
    │   └── TextLatentsError         the MiniLM model or a text could not be loaded
    ├── SessionInUseError
    ├── InvalidInputError (ValueError)   bad latents or records: one class per dead-letter reason
    │   ├── BadKeyError, TruncatedError, OversizeError, BadMagicError, UnknownVersionError,
    │   │   UnsupportedDTypeError, ShapeError, ChecksumError, BadEventError, NonFiniteError
    │   └── DTypeMismatchError, DimMismatchError, ReorderedError,
    │       UnknownSessionError, ClosedSessionError, OperatorWidthError, OutOfRangeError,
    │       WindowTooLargeError, ForeignProducerError, ConflictingContentError, CollectedSessionError,
    │       KeyDestroyedError, KeyUnavailableError
    ├── IntegrityError               stored or received data failed a cryptographic check
    │   ├── SignatureError
    │   ├── VerificationError
    │   └── ReplayError
    ├── AppendOnlyViolation
    ├── GovernanceError
    └── ReadError                    a read memstream refuses (``status``/``code`` for HTTP)
        ├── InvalidQueryError (ValueError)
        ├── SessionNotFoundError (LookupError)
        ├── AuthenticationError      no credential, or one that is unknown, expired or revoked (401)
        └── AuthorizationError       a valid credential not granted what it asked for (403)
"""

from memstream.schemas.records import DeadLetterReason as _R


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


class TopicMissingError(ConfigError):
    """A Kafka topic does not exist (the broker does not create topics on use)."""

    def __init__(self, topic: str, bootstrap: str):
        self.topic = topic
        super().__init__(f"topic {topic!r} does not exist on {bootstrap}: create it with "
                         f"`memstream topics create {topic} --bootstrap {bootstrap}`")


class ChunkLimitError(ConfigError):
    """The chunk byte limit cannot hold one latent, or exceeds what the broker accepts."""


class SessionInUseError(MemstreamError):
    """A session id is already open in this publisher."""


class KafkaSecurityError(ConfigError):
    """Kafka security settings (``security_protocol``, ``sasl_*``, ``ssl_*``) that do not fit
    together, or name a file that does not exist: the message says which setting to set."""


class KafkaAuthenticationError(ServiceError):
    """The broker refused the SASL login, or the TLS handshake with it failed (an untrusted or
    mismatched certificate, or TLS spoken to a plaintext listener): the message names the
    bootstrap, the protocol and what to check."""

    def __init__(self, bootstrap: str, protocol: str, cause: str, check: str):
        self.bootstrap, self.protocol = bootstrap, protocol
        super().__init__(f"Kafka at {bootstrap} ({protocol}): {cause}; check {check}")


class PublishError(ServiceError):
    """Kafka did not acknowledge a message after its retries; the cause says why."""


class TextLatentsError(ServiceError):
    """The MiniLM model or the text could not be loaded."""


class CheckpointError(ConfigError):
    """A compressor checkpoint is missing, unreadable, or does not fit the model."""


class KeyPermissionError(ConfigError):
    """A private key file is readable (or writable) by its group or others: ``chmod 600`` it."""


class KeyRoleError(ConfigError):
    """A key file states another role than the one asked for, or one key is configured in two
    roles (validator, governance, maintenance, witness): make a key per role with
    ``memstream keys new --role ROLE``."""


# -- invalid latents and records -------------------------------------------------------------
# One class per dead-letter reason (memstream.schemas.records.DeadLetterReason). The producer
# raises the ones a caller can cause (shape, dtype, NaN, closed session) before sending; the
# consumer's decoder and validator raise all of them, and each becomes a dead-letter record.

class InvalidInputError(MemstreamError, ValueError):
    """Latents or a record that memstream refuses; ``reason`` is the dead-letter reason code."""

    reason: _R


class BadKeyError(InvalidInputError):
    """The Kafka key is missing or not UTF-8: keys are session ids."""
    reason = _R.bad_key


class TruncatedError(InvalidInputError):
    """The record is shorter than its header says: publish it again, whole."""
    reason = _R.truncated


class OversizeError(InvalidInputError):
    """The record is longer than its header says, or larger than the configured limit."""
    reason = _R.oversize


class BadMagicError(InvalidInputError):
    """The value is not a memstream latent chunk or session event."""
    reason = _R.bad_magic


class UnknownVersionError(InvalidInputError):
    """The record's schema version is newer than this memstream: upgrade the consumer."""
    reason = _R.unknown_version


class UnsupportedDTypeError(InvalidInputError):
    """Latents must be float32, float16 or bfloat16."""
    reason = _R.unsupported_dtype


class ShapeError(InvalidInputError):
    """Latents must be a 2-D array [n, d] with d >= 1 (and n >= 1 on the wire)."""
    reason = _R.bad_shape


class ChecksumError(InvalidInputError):
    """The chunk's CRC-32C does not match its bytes: it was corrupted after publishing."""
    reason = _R.checksum


class BadEventError(InvalidInputError):
    """A session event's JSON body does not match the session_event schema or its key."""
    reason = _R.bad_event


class NonFiniteError(InvalidInputError):
    """Latents hold NaN or Inf: fix the model output (or mask it) before publishing."""
    reason = _R.non_finite


class DTypeMismatchError(InvalidInputError):
    """The dtype differs from the one the session started with: one session, one dtype."""
    reason = _R.dtype_mismatch


class DimMismatchError(InvalidInputError):
    """The latent width differs from the one the session started with: one session, one dim."""
    reason = _R.dim_mismatch


class ReorderedError(InvalidInputError):
    """The chunk arrived after later latents of its session; it is not a retry of a seen chunk."""
    reason = _R.reordered


class UnknownSessionError(InvalidInputError):
    """A chunk or close arrived for a session that was never opened."""
    reason = _R.unknown_session


class ClosedSessionError(InvalidInputError):
    """The session is closed: open a new session id to publish more latents."""
    reason = _R.closed_session


class OperatorWidthError(InvalidInputError):
    """The latents are not as wide as the compressor's input: publish latents of its width."""
    reason = _R.operator_width


class OutOfRangeError(InvalidInputError):
    """A number is out of range: a sequence or time field at or beyond 2**63, or latents too
    large for the summary tokens to hold."""
    reason = _R.out_of_range


class WindowTooLargeError(InvalidInputError):
    """A window of the session's latents would not fit the pipeline's memory limit."""
    reason = _R.window_too_large


class ForeignProducerError(InvalidInputError):
    """A chunk or close event came from another producer than the one that opened the session."""
    reason = _R.foreign_producer


class ConflictingContentError(InvalidInputError):
    """Latents already accepted were sent again with other bytes: a producer must resend a range
    exactly as it first sent it."""
    reason = _R.conflicting_content


class CollectedSessionError(InvalidInputError):
    """The session was collected (session GC): its memory is gone and is not made again."""
    reason = _R.collected_session


class KeyDestroyedError(InvalidInputError):
    """The record is sealed under a data key that a forget request destroyed: it can never be
    read again, by design."""
    reason = _R.key_destroyed


class KeyUnavailableError(InvalidInputError):
    """The record is sealed under a data key this consumer cannot get: no key table was
    configured (pass the master key file), or the key table has no such key."""
    reason = _R.key_unavailable


INVALID_INPUT_ERRORS: dict[_R, type[InvalidInputError]] = {
    cls.reason: cls for cls in InvalidInputError.__subclasses__()}


class IntegrityError(MemstreamError):
    """Stored or received data failed a cryptographic check: treat it as tampered with."""


class SignatureError(IntegrityError):
    """A signature does not verify, or its key id is not in the key ring."""


class VerificationError(IntegrityError):
    """A Merkle proof, tree head or stored row does not check out."""


class WitnessRefusal(IntegrityError):
    """A witness refused to cosign a head: it does not extend the heads the witness cosigned
    before (``kind`` rollback, truncation, fork or unlinked), or its proof or signature fails
    (``kind`` proof, signature). A rollback, truncation or fork means the operator's storage
    went back or was rewritten: investigate it before writing anything more."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ReplayError(IntegrityError):
    """A signed write or request was already applied: sign a fresh one instead of resending."""


class AppendOnlyViolation(MemstreamError):
    """An update or delete was attempted on append-only storage."""


class GovernanceError(MemstreamError):
    """A governance action lacks the approvals its policy requires."""


class LeaseError(ServiceError):
    """A storage lease (the lock that keeps cleanup and writers apart) could not be taken."""


class FencedError(ServiceError):
    """A newer holder took over: a newer instance of the pipeline (its topic and store), or a
    newer holder of a storage lease. This one stops, so that two never write at once."""


class StateLostError(ServiceError):
    """The runner lost or forked a session's keyed state (records the state never saw were
    found in the log): the bundle fails rather than cut wrong windows, and is run again."""


# -- reads -----------------------------------------------------------------------------------
# The read API's refusals; ``status`` and ``code`` are what the HTTP service answers with.

class ReadError(MemstreamError):
    """A read that memstream refuses to answer."""

    status = 400
    code = "bad_read"


class InvalidQueryError(ReadError, ValueError):
    """The query latent, k or route is not acceptable: the message says which and what is expected."""

    status = 422
    code = "invalid_query"


class SessionNotFoundError(ReadError, LookupError):
    """The episodic store holds no summary of this session: publish its latents and run the pipeline first."""

    status = 404
    code = "unknown_session"


class AuthenticationError(ReadError):
    """No credential, or one memstream does not accept (malformed, unknown, expired or revoked):
    send ``Authorization: Bearer <credential>`` with one from `memstream credentials issue`."""

    status = 401
    code = "unauthenticated"


class AuthorizationError(ReadError):
    """The credential is valid but not granted this session: issue one for the tenant that owns it."""

    status = 403
    code = "forbidden"


__all__ = [
    "MemstreamError", "ConfigError", "ServiceError", "ToolMissingError", "ServiceNotReadyError",
    "TopicMissingError", "ChunkLimitError", "KafkaSecurityError", "KafkaAuthenticationError", "SessionInUseError", "PublishError", "TextLatentsError",
    "CheckpointError", "KeyPermissionError", "KeyRoleError", "InvalidInputError", "BadKeyError", "TruncatedError",
    "OversizeError", "BadMagicError",
    "UnknownVersionError", "UnsupportedDTypeError", "ShapeError", "ChecksumError", "BadEventError",
    "NonFiniteError", "DTypeMismatchError", "DimMismatchError", "ReorderedError",
    "UnknownSessionError", "ClosedSessionError", "OperatorWidthError", "OutOfRangeError",
    "WindowTooLargeError", "ForeignProducerError", "ConflictingContentError", "CollectedSessionError",
    "KeyDestroyedError", "KeyUnavailableError", "IntegrityError", "SignatureError", "VerificationError", "ReplayError", "AppendOnlyViolation",
    "GovernanceError", "LeaseError", "FencedError", "StateLostError", "ReadError", "InvalidQueryError",
    "SessionNotFoundError", "AuthenticationError", "AuthorizationError",
    "INVALID_INPUT_ERRORS",
]
