"""Creating a TrainJob through the Kubernetes API and waiting for it: conditions, timeout, SIGTERM,
keep or delete. The API is injected (anything with the ``*_namespaced_custom_object`` methods)."""

from __future__ import annotations

import copy
import json
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from components.common import ConfigError
from components.trainjobs.spec import (
    GROUP,
    MAX_READ_ERRORS,
    PLURAL,
    VERSION,
    CancelledError,
    TrainJobError,
    TrainJobFailedError,
    TrainJobNotCreatedError,
    TrainJobResult,
    TrainJobTimeoutError,
    check_keep,
    param_name,
)


def _api_status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)
    return status if isinstance(status, int) else None


def _api_message(e: BaseException) -> str:
    """The API server's own message from an ApiException's JSON body, else the exception's text."""
    body = getattr(e, "body", None)
    if body:
        try:
            data = json.loads(body)
        except (TypeError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    reason = getattr(e, "reason", None)
    if reason:
        return f"{_api_status(e) or ''} {reason}".strip()
    return str(e) or type(e).__name__


def _create_error(e: BaseException, namespace: str, name: str) -> str:
    status, msg = _api_status(e), _api_message(e)
    where = f"TrainJob {namespace}/{name}"
    if status == 404:
        return (
            f"cannot create {where}: {msg}. Is Kubeflow Trainer installed (CRD trainjobs.{GROUP}) and does "
            f"namespace {namespace} exist? See docs/kubernetes.md"
        )
    if status == 403:
        return (
            f"cannot create {where}: {msg}. The pipeline's service account needs create/get/delete on "
            f"trainjobs in {namespace}: kubectl apply -k k8s/overlays/kubeflow-trainer"
        )
    if status == 409:
        return f"cannot create {where}: a TrainJob of that name exists already ({msg})"
    if status in (400, 422):
        return f"{where} was rejected by the API server (is runtime and image right?): {msg}"
    return f"cannot create {where}: {msg}"


def _conditions(obj: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return [c for c in conds if isinstance(c, dict)]


def _true(conds: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conds if c.get("type") == kind and c.get("status") == "True"), None)


def _summary(conds: Sequence[Mapping[str, Any]]) -> str:
    if not conds:
        return "no conditions yet (Trainer has not picked the job up: is its controller running?)"
    return "; ".join(
        f"{c.get('type')}={c.get('status')}"
        + (f" ({c.get('reason')}: {c.get('message')})" if c.get("reason") or c.get("message") else "")
        for c in conds
    )


def should_delete(keep: str, outcome: str) -> bool:
    """never: always delete; failed: keep a failed job (its pods' logs), delete the rest; always: keep.
    A job still running when the wait ends (timeout, cancel) is deleted unless keep is always: it would
    hold its nodes."""
    return keep == "never" or (keep == "failed" and outcome != "failed")


def print_line(message: str) -> None:
    print(message, flush=True)


def create_and_wait(
    api: Any,
    manifest: Mapping[str, Any],
    timeout_s: float,
    poll_s: float = 15.0,
    *,
    keep: str = "failed",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] | None = None,
    handle_sigterm: bool = True,
) -> TrainJobResult:
    """Create the TrainJob ``manifest`` through ``api`` (a ``kubernetes.client.CustomObjectsApi``), poll
    its conditions every ``poll_s`` until ``Complete`` (returned) or ``Failed`` (:class:`TrainJobFailedError`
    with the job's own message) or ``timeout_s`` (:class:`TrainJobTimeoutError` with its last conditions),
    then delete it or keep it per ``keep`` (:data:`KEEP_CHOICES`, see :func:`should_delete`).

    A SIGTERM while waiting (the KFP run was cancelled) ends the wait like a timeout, so the job is
    deleted rather than left running.
    """
    keep = check_keep(keep)
    if not timeout_s or timeout_s <= 0:
        raise ConfigError(f"{param_name('timeout_s')} must be > 0, got {timeout_s!r}")
    if not poll_s or poll_s <= 0:
        raise ConfigError(f"poll interval must be > 0, got {poll_s!r}")
    say = log or print_line
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    where = f"TrainJob {namespace}/{name}"
    ref = {"group": GROUP, "version": VERSION, "namespace": namespace, "plural": PLURAL}
    try:
        api.create_namespaced_custom_object(body=copy.deepcopy(dict(manifest)), **ref)
    except Exception as e:
        raise TrainJobNotCreatedError(_create_error(e, namespace, name)) from e
    trainer = manifest.get("spec", {}).get("trainer", {})
    say(
        f"created {where}: {trainer.get('numNodes', 1)} node(s) x {trainer.get('numProcPerNode', 1)} "
        f"process(es); logs: kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name} -f"
    )

    installed, previous = False, None
    if handle_sigterm and threading.current_thread() is threading.main_thread():

        def on_sigterm(signum: int, frame: Any) -> None:
            raise CancelledError(f"{where}: the task was stopped (SIGTERM) while waiting")

        previous, installed = signal.signal(signal.SIGTERM, on_sigterm), True
    start = clock()
    outcome, obj, errors, seen = "unfinished", None, 0, ""
    try:
        while True:
            try:
                obj = api.get_namespaced_custom_object(name=name, **ref)
                errors = 0
            except Exception as e:
                if _api_status(e) == 404:
                    raise TrainJobError(f"{where} disappeared while running (deleted by someone?)") from e
                errors += 1
                if errors > MAX_READ_ERRORS:
                    raise TrainJobError(f"cannot read {where} ({errors} tries): {_api_message(e)}") from e
                say(f"reading {where} failed ({_api_message(e)}); retrying")
            conds = _conditions(obj)
            now = _summary(conds) if obj is not None else seen
            if now != seen:
                progress = ((obj or {}).get("status") or {}).get("trainerStatus") or {}
                pct = progress.get("progressPercentage")
                say(f"{where}: {now}" + (f" [{pct}%]" if pct is not None else ""))
                seen = now
            failed = _true(conds, "Failed")
            if failed:
                outcome = "failed"
                kept = not should_delete(keep, outcome)
                raise TrainJobFailedError(
                    f"{where} failed ({failed.get('reason') or 'no reason'}): "
                    f"{failed.get('message') or 'no message'}. "
                    + (
                        f"Logs: kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name} "
                        "--tail=200 (the job is kept)"
                        if kept
                        else f"The job was deleted ({param_name('keep')}={keep}); keep it with failed or "
                        "always"
                    )
                )
            if _true(conds, "Complete"):
                outcome = "complete"
                return TrainJobResult(
                    name,
                    namespace,
                    dict((obj or {}).get("status") or {}),
                    clock() - start,
                    should_delete(keep, outcome),
                )
            left = timeout_s - (clock() - start)
            if left <= 0:
                raise TrainJobTimeoutError(
                    f"{where} did not finish within {timeout_s:g} s ({param_name('timeout_s')}); last state: "
                    f"{_summary(conds)}"
                )
            sleep(min(poll_s, left))
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if should_delete(keep, outcome):
            try:
                api.delete_namespaced_custom_object(name=name, propagation_policy="Background", **ref)
                say(f"deleted {where}")
            except Exception as e:  # never hide the outcome behind a failed clean-up
                if _api_status(e) != 404:
                    say(f"could not delete {where}: {_api_message(e)}; delete it by hand")
        else:
            say(f"kept {where} ({param_name('keep')}={keep}); kubectl -n {namespace} delete trainjob {name}")


def custom_objects_api() -> Any:
    """A ``CustomObjectsApi`` with the pod's service account (in a cluster) or the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()
