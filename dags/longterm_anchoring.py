"""Airflow DAG ``longterm_anchoring``: publishes the long-term store's latest signed tree head
to the attestations topic, where auditors keep it (see memstream.maintenance.longterm)."""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from memstream import settings
from memstream.dags import dagkit


@dag(dag_id="longterm_anchoring", schedule="@hourly", start_date=dagkit.START, catchup=False, max_active_runs=1,
     default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={
         **dagkit.longterm_params(), **dagkit.storage_params(),
         "kafka_bootstrap": dagkit.bootstrap_param(),
         "attestations_topic": Param(settings.ATTESTATIONS_TOPIC, type="string", minLength=1,
                                     description="topic the signed tree heads go to"),
     })
def longterm_anchoring():
    @task
    def publish_tree_head(**context) -> dict:
        from memstream.maintenance.longterm import anchor

        p = context["params"]
        return anchor(dagkit.longterm_store(p, kafka=True))

    publish_tree_head()


longterm_anchoring()
