"""The ``ray`` backend: tails run on Ray Serve replicas, on as many machines as the cluster has.

This process stays the one worker that edges see (the protocol, limits, authentication,
de-duplication, metrics and mDNS are unchanged); it is a Ray *driver* that deploys the
application ``splitinfer-<worker id>`` (one deployment, ``tails``, of
:class:`~.ray_replica.TailReplica`) and calls it through a ``DeploymentHandle``.

- Without ``ray_address`` it starts a local Ray instance (``ray.init``) and stops it on
  exit; with one it joins that cluster and, on exit, deletes only its own application.
- Admission (queue and per-client share), fairness and batching are decided here: requests
  queue in this process and leave in batches formed by the local batcher's rules, one
  handle call per batch (:mod:`.ray_batches`); a call's per-request CPU (router, replica,
  serialization) is what made the Ray path slow, so a batch of n pays it once.
- Faults become explicit answers: a batch whose replica dies mid-run is retried once on
  another (Ray restarts the dead one), then each of its requests gets ``overloaded``; a
  cluster whose head is gone answers ``overloaded`` at once with that reason (a watchdog
  checks the head's GCS port), and a joined worker rejoins when a head answers there again;
  nothing waits past its deadline, or ``backend_timeout_s`` without one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import signal
import threading
import time
from collections import Counter
from typing import Any, Callable, TypeVar

import torch

from splitinfer.cloud.backends.base import Admission, Backend, DeadlineExceeded, JobResult, Overloaded, client_limit
from splitinfer.cloud.backends.ray_batches import DriverBatcher, RayJob
from splitinfer.cloud.config import WorkerConfig
from splitinfer.cloud.registry import ModelRegistry, Tail
from splitinfer.errors import UserError

__all__ = ["RayBackend"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEPLOY_TIMEOUT_S = 180.0  # replicas that cannot be placed (too few CPUs) fail the start after this
TEARDOWN_TIMEOUT_S = 20.0  # leaving a cluster that no longer answers must not hold the exit
WATCH_EVERY_S = 0.5  # how often the head's GCS port is checked
REJOIN_RETRY_S = 5.0  # a restarted head that could not be joined is tried again after this
RETRY_MIN_S = 0.05  # a call is retried (its replica died) only with at least this much time left
OBJECT_STORE_BYTES = 256 * 2**20  # a local Ray's object store: activations in flight, not a cache
DEPTH = 2  # batches out per replica: one running, the next one on its way
APP_PREFIX = "splitinfer-"  # a worker's Serve application: splitinfer-<worker id>
OWNER_PREFIX = "splitinfer-owner-"  # ... and the actor that lives as long as that worker
# Ray Serve's documented throughput flags (docs: Serve "Performance Tuning"): the router runs on
# this worker's event loop and a replica's `run` on the replica's main loop, instead of a thread
# hop each way per call; both loops only await (torch runs on executor threads), as the flags ask.
# Not RAY_SERVE_THROUGHPUT_OPTIMIZED: that also opens HTTP ports on the replicas (direct ingress).
SERVE_FLAGS = {
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}
# Ray's per-call bookkeeping that a serving worker does not read (it keeps its own metrics):
# task events for the dashboard's task list, Ray's own metrics export, per-handler event-loop
# stats, and a controller that polls 10 times a second. On 2 cores they cost 1-9 ms of CPU per
# call (worker, replicas, GCS, dashboard agent, controller; `bench cloud`'s cpu_ms_per_request),
# and 2 replicas answered 0-22 % more with them off (three bench pairs, 2026-12-03). Each can be
# set back in the environment.
# `ray list tasks` and the dashboard then show no task of ours; `serve status` is unaffected.
QUIET_RAY_FLAGS = {
    "RAY_task_events_report_interval_ms": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_event_stats": "0",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}
PROCESS_FLAGS = {**SERVE_FLAGS, **QUIET_RAY_FLAGS}  # this process, a local Ray's, and every replica


class RayBackend(Backend):
    name = "ray"

    def __init__(
        self,
        config: WorkerConfig,
        registry: ModelRegistry,
        on_batch: Callable[[int], None] | None = None,
        on_served: Callable[[str, str, int], None] | None = None,
        handle: Any = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.on_batch = on_batch
        self.on_served = on_served  # metrics hook: (replica, node, pid) of each answer
        self.app_name = APP_PREFIX + config.worker_id
        self.admission = Admission(config.max_queue, client_limit(config.max_batch, config.max_queue, config.client_share))
        most = config.autoscale[1] if config.autoscale else config.replicas
        self.batches = DriverBatcher(max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, replicas=most,
                                     depth=DEPTH, send=self._send, down=lambda: self.down)  # fmt: skip
        # Ray Serve's own cap per replica, above what we send: a replica counts a call until its
        # answer has left, so at exactly our count it rejects the next call now and then, and the
        # handle backs off (25 ms and more) before trying again; and while a replica restarts,
        # every batch out may go to the others
        self.max_ongoing = 2 * most * DEPTH
        self.handle: Any = handle  # given: tests without a cluster (start() then deploys nothing)
        self._run: Any = None  # the handle of the replicas' `run` (made once: each attribute access copies it)
        self.gcs_address = ""
        self.down = ""  # why the cluster cannot be used right now ("" while it can)
        self.served: Counter[str] = Counter()
        self._owns_ray = False
        self._owner: Any = None  # on a joined cluster: the actor that dies with this process
        self._watchdog: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="exclusive")
        self._control = _ControlThread()

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        if self.handle is not None:
            self._run = self.handle.run
            self.batches.start()
            return
        try:
            await self._control.run(self._deploy, DEPLOY_TIMEOUT_S)
        except TimeoutError:
            raise UserError(f"the Ray Serve replicas did not start within {DEPLOY_TIMEOUT_S:.0f} s "
                            "(does the cluster have the CPUs for them?)") from None
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="ray-watchdog")
        self._run = self.handle.run
        self.batches.start()

    def _deploy(self) -> None:
        # before Serve is imported (it reads them once): this process's router, and a local Ray's replicas
        for name, value in PROCESS_FLAGS.items():
            os.environ.setdefault(name, value)
        import ray
        from ray import serve

        from splitinfer.cloud.backends.ray_replica import AppOwner, TailReplica

        cfg = self.config
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a worker
        # Ray's C++ handler would abort on SIGTERM; the worker's own handler drains and stops Ray
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        # the router asks replicas their queue length within 0.1 s by default: too short on a busy machine
        os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "0.5")
        if cfg.ray_address:  # a joined cluster's head may go: answer `overloaded` instead of exiting after 60 s
            os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(365 * 86400))
        common: dict[str, Any] = {"namespace": "splitinfer", "logging_level": logging.WARNING, "log_to_driver": False}
        if cfg.ray_address:
            try:
                ray.init(address=cfg.ray_address, **common)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"cannot join the Ray cluster at {cfg.ray_address}: {exc}") from None
        else:
            most = cfg.autoscale[1] if cfg.autoscale else cfg.replicas
            cpus = max(os.cpu_count() or 1, int(most * cfg.replica_cpus + 0.999))
            # address="local": always a new instance, never a cluster already running on this machine
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, **common)
            self._owns_ray = True
        self.gcs_address = ray.get_runtime_context().gcs_address
        serve.start(proxy_location="Disabled")  # edges reach the tails through this worker only
        if cfg.ray_address:  # a shared cluster: say this worker lives, and remove dead workers' apps
            self._owner = ray.remote(AppOwner).options(name=OWNER_PREFIX + cfg.worker_id, num_cpus=0).remote()
            _remove_orphans(self.app_name)
        options: dict[str, Any] = {
            "name": "tails",
            # the flags also on a joined cluster's nodes, whose processes did not inherit ours
            "ray_actor_options": {"num_cpus": cfg.replica_cpus, "runtime_env": {"env_vars": dict(PROCESS_FLAGS)}},
            "max_ongoing_requests": self.max_ongoing,
            "health_check_period_s": 2.0,
            "graceful_shutdown_timeout_s": 5.0,
            # no access-log line per call (the worker has its own metrics); warnings still logged
            "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
        }
        if cfg.autoscale:
            low, high = cfg.autoscale
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": 1,  # a call is a batch: more than one out means a queue
                "upscale_delay_s": 2.0,
                "downscale_delay_s": 30.0,
            }
        else:
            options["num_replicas"] = cfg.replicas
        hashes = {m.model_id: m.hash for m in self.registry.models.values()}
        threads = cfg.threads or max(1, int(cfg.replica_cpus))
        app = serve.deployment(TailReplica).options(**options).bind(list(cfg.models), hashes, threads)
        self.handle = serve.run(app, name=self.app_name, route_prefix=None)
        log.info("ray backend: application %s on the cluster at %s", self.app_name, self.gcs_address)

    def drain(self) -> None:
        self.batches.drain()

    async def close(self) -> None:
        deadline = time.monotonic() + self.config.backend_timeout_s
        while self.admission.queued and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.batches.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        try:
            await self._control.run(self._teardown, TEARDOWN_TIMEOUT_S)
        except TimeoutError:
            log.warning("leaving the Ray cluster timed out after %.0f s", TEARDOWN_TIMEOUT_S)
        self._control.stop()
        self._executor.shutdown(wait=False)

    def _teardown(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            if self._owns_ray:
                serve.shutdown()
            elif not self.down:
                serve.delete(self.app_name)  # the cluster stays; only this worker's replicas go
        except Exception as exc:  # the cluster is gone already: nothing left to remove
            log.info("ray backend teardown: %s", exc)
        ray.shutdown()  # stops the local Ray this worker started (raylet, GCS, workers)

    async def _watch(self) -> None:
        """Mark the cluster down while its head's GCS port refuses connections, so that
        requests are answered at once rather than at their deadline; when a joined cluster's
        head answers again, rejoin it (a restarted head is a new cluster: the old connection,
        handle and replicas are gone, and calls on them would only wait for their deadline)."""
        lost = False  # the head went away since this worker last joined
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            host, _, port = self.gcs_address.rpartition(":")  # a rejoin sets it anew
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
                writer.close()
            except (OSError, asyncio.TimeoutError) as exc:
                if not self.down:
                    log.error("ray backend: the Ray head at %s is gone (%s)", self.gcs_address, exc)
                self.down = f"the Ray cluster's head at {self.gcs_address} is unreachable; tails cannot run"
                lost = True
                continue
            if lost and self.config.ray_address:
                lost = not await self._rejoin()
                if lost:
                    await asyncio.sleep(REJOIN_RETRY_S)
                    continue
            elif self.down:
                log.warning("ray backend: the head at %s answers again", self.gcs_address)
            self.down = ""

    async def _rejoin(self) -> bool:
        """Leave the lost cluster and join (deploy on) the one at ``ray_address`` again."""
        address = self.config.ray_address
        log.warning("ray backend: the head at %s answers again; rejoining the cluster", address)
        self.down = f"the Ray cluster's head at {address} restarted; the worker is rejoining it"

        def rejoin() -> None:
            import ray

            ray.shutdown()  # the old connection: its handle and replicas belong to a cluster that is gone
            self._deploy()

        handlers = _signal_handlers()
        try:
            await self._control.run(rejoin, DEPLOY_TIMEOUT_S)
        except Exception as exc:  # kept down; tried again
            log.error("ray backend: rejoining the cluster at %s failed: %s", address, exc)
            self.down = f"the Ray cluster's head at {address} restarted and the worker could not rejoin it ({exc})"
            return False
        finally:
            _restore_signal_handlers(handlers)
        self._run = self.handle.run
        log.warning("ray backend: rejoined the cluster at %s (application %s)", address, self.app_name)
        return True

    # ------------------------------------------------------------------ work
    @property
    def queued(self) -> int:
        return self.admission.queued

    async def exclusive(self, fn: Callable[[], T]) -> T:
        # Profiling measures this machine's copy of the model; the replicas keep serving.
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(
        self, tail: Tail, tensors: dict[str, torch.Tensor], batch: int, deadline: float | None, client: str = ""
    ) -> JobResult:
        if self.down:
            raise Overloaded(self.down)
        with self.admission.hold(client, batch):
            return await self.batches.submit(tail, tensors, batch, deadline, client, self.config.backend_timeout_s)

    async def _send(self, jobs: list[RayJob]) -> None:
        """One handle call for a batch (retried once if its replica died); settles every job."""
        from splitinfer.cloud.backends.ray_replica import TailCall, from_arrays, to_arrays

        sent = jobs[0].sent or time.monotonic()  # stamped by the batcher as the batch left
        tail = jobs[0].tail
        inputs, dtypes = [], {}
        for job in jobs:
            arrays, dtypes = to_arrays(job.tensors)
            inputs.append(arrays)
        hosted = self.registry.models[tail.model_id]
        call = TailCall(tail.model_id, hosted.hash, tail.cut_id, inputs, dtypes, [j.batch for j in jobs])
        try:
            answer = await self._remote(call, max(j.limit for j in jobs), any(j.deadline is not None for j in jobs))
            if answer.error:
                raise RuntimeError(f"tail failed on replica {answer.replica}: {answer.error}")
        except Exception as exc:  # the batch failed as a whole: each of its requests says why
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        assert answer.outputs is not None and len(answer.outputs) == len(jobs)
        self.batches.pacing.observe(answer.batch_size, answer.compute_ms)  # when the next batch may leave
        if self.on_batch and answer.batch_size:
            self.on_batch(answer.batch_size)
        node = answer.node[:12]
        self.served[f"{answer.replica}@{node}"] += len(jobs)
        for job, outputs in zip(jobs, answer.outputs):
            if self.on_served:  # one answer per request (or chunk) of the batch
                self.on_served(answer.replica, node, answer.pid)
            if not job.future.done():
                job.future.set_result(JobResult(
                    from_arrays(outputs, answer.dtypes), queue_ms=(sent - job.enqueued) * 1e3,
                    compute_ms=answer.compute_ms, batch_size=answer.batch_size, served_by=answer.replica, node=node,
                ))  # fmt: skip

    async def _remote(self, call: Any, limit: float, has_deadline: bool) -> Any:
        """The replica's answer to ``call`` by ``limit``, or the exception its requests get."""
        from ray import exceptions as rex
        from ray.serve import exceptions as sex

        for attempt in range(2):
            response = self._run.remote(call)
            try:
                return await asyncio.wait_for(_awaited(response), max(0.001, limit - time.monotonic()))
            except asyncio.TimeoutError:
                response.cancel()
                if self.down:
                    raise Overloaded(self.down) from None
                if has_deadline:
                    raise DeadlineExceeded("deadline passed while the tail ran on a Ray replica") from None
                raise Overloaded(f"no answer from the Ray replicas within {self.config.backend_timeout_s:g} s") from None
            except (rex.RayActorError, sex.ReplicaUnavailableError, rex.WorkerCrashedError, rex.NodeDiedError) as exc:
                if self.down:
                    raise Overloaded(self.down) from None
                if attempt == 0 and limit - time.monotonic() > RETRY_MIN_S:
                    log.warning("ray backend: a replica failed mid-batch (%s); retrying once", type(exc).__name__)
                    continue
                raise Overloaded("a tail replica died while running this request; Ray restarts it, retry") from None
            except sex.BackPressureError:
                raise Overloaded("the Ray replicas' queues are full; retry later") from None
            except rex.RayTaskError as exc:  # our replica code raised: a bug, not load
                raise RuntimeError(f"tail replica failed: {exc}") from None
            except rex.RayError as exc:
                raise Overloaded(self.down or f"the Ray cluster failed this call ({type(exc).__name__})") from None
        raise AssertionError("unreachable")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "app": self.app_name, "cluster": self.gcs_address,
                               "local_ray": self._owns_ray, "served": dict(self.served),
                               "batches": self.batches.batches}  # fmt: skip
        if self.config.autoscale:
            out["autoscale"] = list(self.config.autoscale)
        else:
            out["replicas"] = self.config.replicas
        if self.down:
            out["down"] = self.down
        return out


def _remove_orphans(own_app: str) -> None:
    """Delete the applications of workers that died without removing theirs (SIGKILL, a lost
    machine): an app ``splitinfer-<id>`` whose owner actor ``splitinfer-owner-<id>`` is gone."""
    import ray
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception as exc:  # Serve not running yet on this cluster: nothing to remove
        log.debug("ray backend: no Serve status (%s)", exc)
        return
    for app in apps:
        if not app.startswith(APP_PREFIX) or app == own_app:
            continue
        try:
            ray.get_actor(OWNER_PREFIX + app[len(APP_PREFIX):])
        except ValueError:
            log.warning("ray backend: removing application %s, whose worker is gone", app)
            serve.delete(app, _blocking=False)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _signal_handlers() -> dict[int, Any]:
    return {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    """Put back the worker's SIGINT/SIGTERM handlers (its drain on exit): leaving and joining a
    cluster again resets them to the default, which would end the process without draining."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set them (and only it has them: tests run backends elsewhere)
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


async def _awaited(response: Any) -> Any:
    return await response


class _ControlThread:
    """One long-lived daemon thread for every Ray control call (init, deploy, teardown).

    Long-lived because Ray starts a local instance's processes with PR_SET_PDEATHSIG, which
    fires when the *thread* that started them ends; a daemon, because a hung call into a
    cluster that is gone must not hold the process's exit."""

    def __init__(self) -> None:
        self._jobs: "queue.Queue[tuple[Callable[[], None], asyncio.AbstractEventLoop, asyncio.Future] | None]" = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="ray-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, loop, done = job
            try:
                fn()
            except BaseException as exc:  # handed to the caller
                loop.call_soon_threadsafe(lambda e=exc: done.done() or done.set_exception(e))
            else:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    async def run(self, fn: Callable[[], None], timeout_s: float) -> None:
        """Run ``fn`` on the thread; TimeoutError if it takes longer than ``timeout_s``."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._jobs.put((fn, loop, done))
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{getattr(fn, '__name__', 'call')} took over {timeout_s:g} s") from None

    def stop(self) -> None:
        self._jobs.put(None)
