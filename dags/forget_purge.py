"""Airflow DAG ``forget_purge``: entries bound to the subject of a signed forget request are
erased from every file of the long-term store (data, deletion, index, old-version and
transaction files, both tiers) with writers excluded; a final scan of all storage fails the
run if any forgotten bytes remain; a signed attestation records the purge by hash
(see memstream.maintenance.purge). Nothing is erased before M of N governance keys approved
the plan (``purge.approve``): until then the run skips the erase, and a later run resumes it."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk import dag, task

from memstream.errors import GovernanceError

from memstream.dags import dagkit


@dag(dag_id="forget_purge", schedule="@hourly", start_date=dagkit.START, catchup=False, max_active_runs=1,
     default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={**dagkit.longterm_params(), **dagkit.storage_params(), **dagkit.key_params()})
def forget_purge():
    @task
    def plan(**context) -> dict:
        from memstream.maintenance import purge

        p = context["params"]
        dagkit.signer(p)  # the attestation needs the key: fail before erasing anything, not after
        return purge.plan(dagkit.longterm_store(p))

    @task
    def erase(planned: dict, **context) -> dict:
        from memstream.maintenance import purge

        p = context["params"]
        if planned["purge_id"] is None:
            return {"purge_id": None}
        store = dagkit.longterm_store(p)
        try:
            purge.approved(store, planned["purge_id"])
        except GovernanceError as e:
            # Not yet approved by M of N: a later run resumes the plan once they have approved.
            raise AirflowSkipException(f"purge {planned['purge_id']} awaits governance approval "
                                       f"(`purge.approve`): {e}") from None
        return purge.erase(store, planned["purge_id"], lease_timeout_s=p["lease_timeout_s"])

    @task
    def scan_storage(erased: dict, **context) -> dict:
        from memstream.maintenance import purge

        if erased["purge_id"] is None:
            return {"purge_id": None}
        return purge.check(dagkit.longterm_store(context["params"]), erased["purge_id"])

    @task(outlets=[dagkit.LONGTERM_STORE])
    def attest(scanned: dict, **context) -> dict:
        from memstream.maintenance import purge

        if scanned["purge_id"] is None:
            return {"purge_id": None}
        key = dagkit.signer(context["params"])  # the maintenance key; the store needs no validator key
        store = dagkit.longterm_store(context["params"], maintenance=key)
        return purge.attest(store, scanned["purge_id"], key, scanned)

    attest(scan_storage(erase(plan())))


forget_purge()
