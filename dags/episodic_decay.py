"""Airflow DAG ``episodic_decay``: attention-bias decay of episodic summaries nobody reads,
and eviction of those below the cutoff (see memstream.maintenance.episodic)."""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from memstream.dags import dagkit
from memstream.settings import DECAY_CUTOFF, DECAY_K, DECAY_SLOPE


@dag(dag_id="episodic_decay", schedule="@hourly", start_date=dagkit.START, catchup=False, max_active_runs=1,
     default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={
         "episodic_uri": dagkit.episodic_uri(), **dagkit.storage_params(),
         "k": Param(DECAY_K, type="integer", minimum=0, description="queries a summary may go unread without decay"),
         "slope": Param(DECAY_SLOPE, type="number", minimum=0, description="bias lost per query beyond k"),
         "cutoff": Param(DECAY_CUTOFF, type="number", exclusiveMaximum=0,
                         description="summaries whose bias falls below this are evicted from the window"),
         "dry_run": dagkit.dry_run(),
     })
def episodic_decay():
    @task(outlets=[dagkit.EPISODIC_STORE])
    def decay_and_evict(**context) -> dict:
        from memstream.maintenance.episodic import decay

        p = context["params"]
        return decay(p["episodic_uri"], dagkit.options(p), k=p["k"], slope=p["slope"], cutoff=p["cutoff"],
                     dry_run=p["dry_run"])

    decay_and_evict()


episodic_decay()
