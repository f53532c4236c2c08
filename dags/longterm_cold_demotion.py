"""Airflow DAG ``longterm_cold_demotion``: long-term entries not retrieved (nor written) in
the last N days move to the cold tier: copy, verify the cold copy, remove from hot
(see memstream.maintenance.longterm)."""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from memstream.dags import dagkit
from memstream.settings import COLD_AFTER_DAYS


@dag(dag_id="longterm_cold_demotion", schedule="@daily", start_date=dagkit.START, catchup=False,
     max_active_runs=1, default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={
         **dagkit.longterm_params(), **dagkit.storage_params(),
         "not_retrieved_days": Param(COLD_AFTER_DAYS, type="number", exclusiveMinimum=0,
                                     description="entries not retrieved for this long are demoted"),
         "batch": Param(10_000, type="integer", minimum=1, maximum=100_000, description="entries per demotion"),
         "dry_run": dagkit.dry_run(),
     })
def longterm_cold_demotion():
    @task(outlets=[dagkit.LONGTERM_STORE])
    def demote(**context) -> dict:
        from memstream.maintenance.longterm import demote_stale

        p = context["params"]
        return demote_stale(dagkit.longterm_store(p), older_than_s=p["not_retrieved_days"] * 86400,
                            batch=p["batch"], dry_run=p["dry_run"])

    demote()


longterm_cold_demotion()
