"""Episodic memory, per session: windows cut from the latent stream
(:mod:`~memstream.episodic.window`), their summaries hash-chained and signed
(:mod:`~memstream.episodic.chain`), the decay of what nobody reads (:mod:`~memstream.episodic.decay`),
and the stores that hold them: summaries (:mod:`~memstream.episodic.store`) and the read ledger
(:mod:`~memstream.episodic.ledger`)."""
