"""The latents topic's wire format: encoding and decoding (:mod:`~memstream.wire.codec`), the
per-session rules (:mod:`~memstream.wire.validation`) and dead-letter records
(:mod:`~memstream.wire.deadletter`). Pure: no service is touched here."""
