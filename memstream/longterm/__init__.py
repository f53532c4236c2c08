"""Long-term memory: a signed, append-only, Merkle-attested LanceDB store with a learned
write policy. See :mod:`memstream.longterm.store` for the layout and guarantees."""

from memstream.longterm.entry import (Approval, Entry, ForgetRequest, GovernancePolicy, RemovalRequest, query_hash,
                                      subject_hash)
from memstream.longterm.policy import WriteDecision, WritePolicy
from memstream.longterm.store import (AppendResult, ForgetTicket, Hit, InclusionProof, LongTermStore,
                                      RemovalReceipt, RetrievalStats, RowFailure, VerifyReport)

__all__ = ["Approval", "AppendResult", "Entry", "ForgetRequest", "ForgetTicket", "GovernancePolicy", "Hit",
           "InclusionProof", "LongTermStore", "RemovalReceipt", "RemovalRequest", "RetrievalStats", "RowFailure",
           "VerifyReport", "WriteDecision", "WritePolicy", "query_hash", "subject_hash"]
