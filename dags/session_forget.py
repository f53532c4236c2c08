"""Airflow DAG ``session_forget``: forget the sessions a run names in every tier, then prove it.

Triggered with ``{"session_ids": [...]}`` (no schedule: forgetting is asked for, not periodic).
``fingerprint`` takes salted fingerprints of what must go (each session's data key, in the
clear and wrapped, and its stored summaries) before anything is removed; ``forget`` destroys
the data key, which leaves every copy on the Kafka topics sealed for good, erases the
session's rows from the episodic store and the read ledger, and files a signed forget request
for what long-term memory holds of it, which ``forget_purge`` erases once M of N governance
keys approved; ``prove`` scans the broker log directories, the stores, the ledger and the key
table for the fingerprints and fails the run if any is found (see memstream.maintenance.forget).
Every task is idempotent: a retry finishes the job."""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from memstream.dags import dagkit


@dag(dag_id="session_forget", schedule=None, start_date=dagkit.START, catchup=False, max_active_runs=1,
     default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={
         "session_ids": Param([], type="array", items={"type": "string", "minLength": 1, "maxLength": 256},
                              uniqueItems=True, description="the sessions to forget"),
         "episodic_uri": dagkit.episodic_uri(), **dagkit.storage_params(),
         **dagkit.master_key_param(),
         "forget_longterm": Param(True, type="boolean",
                                  description="also file a forget request for the sessions' long-term entries"),
         **dagkit.longterm_params(), **dagkit.key_params(), **dagkit.validator_key_params(),
         "kafka_log_dirs": Param([], type="array", items={"type": "string", "pattern": "^/.+"},
                                 description="broker log directories the proof scan covers"),
     })
def session_forget():
    @task
    def fingerprint(**context) -> dict:
        from memstream.maintenance.forget import session_markers

        p = context["params"]
        keys = dagkit.key_table(p, required=True)
        return {sid: session_markers(p["episodic_uri"], dagkit.options(p), sid, keys=keys).to_json()
                for sid in p["session_ids"]}

    @task
    def forget(marks: dict, **context) -> dict:
        from memstream.maintenance.forget import forget_session

        p = context["params"]
        keys, key = dagkit.key_table(p, required=True), dagkit.signer(p)
        longterm = validator = None
        if p["forget_longterm"] and marks:
            validator = dagkit.signer(p, role="validator")
            longterm = dagkit.longterm_store(p, signer=validator, maintenance=key, keys=keys)
        out = {}
        for sid in marks:
            done = forget_session(p["episodic_uri"], dagkit.options(p), sid, keys=keys, key=key,
                                  longterm=longterm, longterm_key=validator)
            out[sid] = {k: done[k] for k in ("key_destroyed", "summaries_removed", "reads_removed")}
            if "longterm" in done:
                out[sid]["longterm"] = {k: done["longterm"].get(k) for k in ("purge_id", "entries", "awaits_approval")}
        return out

    # A proof that finds leftovers is a finding, not a transient failure: no retry.
    @task(retries=0, outlets=[dagkit.EPISODIC_STORE])
    def prove(marks: dict, forgotten: dict, **context) -> dict:
        import logging

        from memstream.errors import IntegrityError
        from memstream.maintenance.forget import SessionMarkers, prove_forgotten

        p = context["params"]
        stores = [(p["episodic_uri"], dagkit.options(p))]
        if p["forget_longterm"] and marks:
            from memstream.maintenance.purge import locations

            stores += locations(dagkit.longterm_store(p))
        out = {}
        for sid, m in marks.items():
            out[sid] = prove_forgotten(SessionMarkers.from_json(m), kafka_log_dirs=p["kafka_log_dirs"], stores=stores)
            logging.getLogger(__name__).info("session %s: %s; forgotten: %s", sid, out[sid], forgotten.get(sid))
        left = sorted(sid for sid, r in out.items() if not r["ok"])
        if left:
            raise IntegrityError(f"bytes of forgotten sessions {left} are still stored: {[out[s] for s in left]}")
        return out

    marks = fingerprint()
    prove(marks, forget(marks))


session_forget()
