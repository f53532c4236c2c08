"""Airflow DAG ``longterm_anchoring``: anchors the memory outside the operator's reach. A
witness with its own storage and key cosigns the long-term store's latest signed tree head
(given a consistency proof from the last head it cosigned) and, with ``episodic_uri``, every
session's episodic chain head; the head also goes to the attestations topic. A witness refusal
(storage rolled back, truncated or forked) fails the run (see memstream.maintenance.longterm
and memstream.witness)."""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from memstream import settings
from memstream.dags import dagkit


@dag(dag_id="longterm_anchoring", schedule="@hourly", start_date=dagkit.START, catchup=False, max_active_runs=1,
     default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={
         **dagkit.longterm_params(), **dagkit.storage_params(), **dagkit.witness_params(),
         "kafka_bootstrap": dagkit.bootstrap_param(),
         "attestations_topic": Param(settings.ATTESTATIONS_TOPIC, type="string", minLength=1,
                                     description="topic the signed tree heads go to"),
         "episodic_uri": Param(None, type=["null", "string"], pattern=dagkit.URI_PATTERN,
                               description="episodic store whose chain heads the witness cosigns; null: none"),
     })
def longterm_anchoring():
    @task
    def publish_tree_head(**context) -> dict:
        from memstream.maintenance.longterm import anchor

        p = context["params"]
        store = dagkit.longterm_store(p, kafka=True)
        return anchor(store, dagkit.witness(p, store.keyring))

    @task
    def anchor_chains(**context) -> dict:
        from memstream.maintenance import keyring
        from memstream.maintenance.episodic import anchor_chains

        p = context["params"]
        witness = dagkit.witness(p, keyring(p.get("validator_keys") or ()))
        if witness is None or not p.get("episodic_uri"):
            return {"sessions": 0, "skipped": "no witness_uri or no episodic_uri"}
        return anchor_chains(p["episodic_uri"], dagkit.options(p), witness=witness)

    publish_tree_head()
    anchor_chains()


longterm_anchoring()
