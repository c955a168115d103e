"""`corom serve --ray`: the same server on Ray Serve, one corom server core per replica.

Where the HTTP layer lives (measured: benchmarks/ray_serve.py): Ray's proxy takes the connection and
routes each request to a replica; the replica runs the very Starlette app `corom serve` runs
(`create_app`: request guard, routes, one error table, its own Embedder and DynamicBatcher) as a
`serve.ingress` ASGI deployment, built at replica start after the model has loaded
(`__serve_build_asgi_app__`). So a request meets one API and one set of errors whichever replica it
reaches. What only the proxy can say (its replica died under the request, all replicas full, no replica
yet) it says in plain text; `ProxyErrors`, installed in the proxy by Ray's proxy callback hook
(`proxy_callback`), rewrites those into the same JSON error shape (a replica lost under a request: 503
with Retry-After, the request can be retried), and the proxy's uvicorn gets `corom serve`'s head
timeout, head bound and connection bound (`runner.guarded_protocol`).

Each replica: its thread budget from its CPUs (`replica_threads`), the load-time check on its own
node's CPU and an export on first use under the cache lock (both `Embedder.load`), a Ray health check
that fails when its batch worker is gone (Ray then replaces it), and on shutdown the batcher's drain
(Ray waits `graceful_shutdown_timeout_s` = the drain deadline, then kills: what is left is answered 503).

Importable for `serve run` and KubeRay: `app_builder({"model": ..., "replicas": 2, ...})` takes the
`corom serve` flags by name (one parser, one meaning) and returns the Ray Serve application
(examples/rayservice.yaml).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from corom_runtime.errors import CoromError, InvalidInputError

log = logging.getLogger(__name__)

RAY_HINT = "corom serve --ray needs Ray Serve: pip install 'corom-onnx[ray,serve]'"
APP_NAME = "corom"
DEPLOYMENT = "CoromReplica"
# the proxy process reads its settings from here (it is started by Ray, not by us)
PROXY_ENV = "COROM_RAY_PROXY"
PROXY_CALLBACK = "corom_runtime.serving.ray_serve:proxy_callback"
PROXY_GRACE_S = 1.0


# -- settings: pure, checked before anything starts ----------------------------------------------------


@dataclass(frozen=True)
class RaySettings:
    """How many replicas, of what size, on which Ray. `replicas` fixed, or `autoscale` (min, max) with
    `target_ongoing` requests per replica; `address` None starts a local Ray, "auto" joins one."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_ongoing: float = 16.0
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing: int = 64  # requests one replica holds at once: enough for its batcher to batch
    address: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise InvalidInputError(f"--replicas must be a whole number of at least 1, got {self.replicas!r} "
                                    "(to scale down to nothing when idle use --autoscale 0:N)")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise InvalidInputError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        for name, value, low in (("--replica-cpus", self.replica_cpus, 0.0), ("--replica-gpus", self.replica_gpus, 0.0),
                                 ("--target-ongoing", self.target_ongoing, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise InvalidInputError(f"{name} must be a number of at least {low:g}, got {value!r}")
        if self.replica_cpus <= 0 and self.replica_gpus <= 0:
            raise InvalidInputError("--replica-cpus is 0 and --replica-gpus is 0: a replica must reserve something, "
                                    "or Ray packs every replica onto one busy CPU")
        if self.target_ongoing <= 0:
            raise InvalidInputError(f"--target-ongoing must be above 0, got {self.target_ongoing!r}")
        if isinstance(self.max_ongoing, bool) or not isinstance(self.max_ongoing, int) or self.max_ongoing < 1:
            raise InvalidInputError(f"max_ongoing must be a whole number of at least 1, got {self.max_ongoing!r}")

    @property
    def most_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    @property
    def fewest_replicas(self) -> int:
        return self.autoscale[0] if self.autoscale else self.replicas


def parse_autoscale(text: str) -> tuple[int, int]:
    """'1:4' -> (1, 4); anything else is an error saying what is expected."""
    low, sep, high = str(text).strip().partition(":")
    try:
        if not sep:
            raise ValueError
        bounds = int(low), int(high)
    except ValueError:
        raise InvalidInputError(f"--autoscale must be MIN:MAX replicas, e.g. 1:4, got {text!r}") from None
    RaySettings(autoscale=bounds)  # the range checks, in one place
    return bounds


def replica_threads(replica_cpus: float, threads: int | None = None) -> int:
    """Intra-op threads of one replica: what was asked, else the whole CPUs it reserves (at least 1).
    A replica running more threads than it reserved would steal from its neighbours on the node."""
    if threads is not None:
        return threads
    return max(1, int(math.floor(replica_cpus + 1e-9)))


def check_fits(settings: RaySettings, nodes: Sequence[Mapping[str, float]], fixed_cluster: bool) -> None:
    """Refuse, before deploying, a replica no node can hold (`nodes`: each node's total resources, as
    `ray.nodes()` reports them), or (`fixed_cluster`: a local Ray, which will not grow) more replicas
    than the whole cluster holds. An autoscaling cluster may add nodes: the total is not checked there."""
    if not nodes:
        raise CoromError("the Ray cluster has no live node")
    for key, flag, need in (("CPU", "--replica-cpus", settings.replica_cpus), ("GPU", "--replica-gpus", settings.replica_gpus)):
        if need <= 0:
            continue
        biggest = max(float(n.get(key, 0.0)) for n in nodes)
        if need > biggest + 1e-9:
            raise CoromError(f"{flag} {need:g}: no node of this Ray cluster has that many {key}s (the largest has "
                             f"{biggest:g}); lower {flag} or add a larger node")
        if fixed_cluster:
            fits = sum(math.floor(float(n.get(key, 0.0)) / need + 1e-9) for n in nodes)
            if fits < settings.fewest_replicas:
                raise CoromError(f"{settings.fewest_replicas} replicas of {need:g} {key} each do not fit this Ray "
                                 f"cluster (room for {fits}); lower the replica count or {flag}")


# -- the application ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What each replica loads: an artifact path or a preset name (replicas reach it by that)."""

    model: str
    variant: str = "auto"
    device: str = "auto"
    threads: int | None = None
    allow_fallback: bool = False
    fidelity: str | None = None  # `--fidelity`: auto runs the fastest variant of this tier


@dataclass(frozen=True)
class RayServeConfig:
    """Everything `build_app` needs: the model, `corom serve`'s own settings, and the Ray layout."""

    model: ModelSpec
    server: Any  # app.ServerSettings (imported lazily: building settings must not need Starlette)
    ray: RaySettings = field(default_factory=RaySettings)
    warm_buckets: bool = True
    drain_s: float = 60.0  # Ray's graceful_shutdown_timeout_s: the replica's drain deadline


class CoromReplica:
    """One replica: a corom server's core (Embedder, DynamicBatcher, the Starlette app)."""

    def __init__(self, config: RayServeConfig) -> None:
        from corom_runtime.embedder import Embedder
        from corom_runtime.serving.app import create_app

        spec = config.model
        threads = replica_threads(config.ray.replica_cpus, spec.threads)
        started = time.perf_counter()
        try:
            self.embedder = Embedder.load(spec.model, variant=spec.variant, device=spec.device, threads=threads,
                                          allow_fallback=spec.allow_fallback, fidelity=spec.fidelity)
        except Exception as exc:
            # the reason travels to `serve.run` (and the Ray dashboard); the replica never claims healthy
            log.error("replica cannot load %s: %s", spec.model, exc)
            raise
        log.info("replica pid %d loaded %s (%s, %d threads) in %.1fs", os.getpid(), spec.model,
                 self.embedder.variant, threads, time.perf_counter() - started)
        self.corom_app = create_app(self.embedder, config.server, warm_buckets=config.warm_buckets)

    def __serve_build_asgi_app__(self):
        return _tagged(self.corom_app, f"{_replica_id()}/{os.getpid()}")

    def check_health(self) -> None:
        """Ray's health probe: a replica whose batch worker is gone is replaced."""
        state = self.corom_app.state
        batcher = state.get("batcher")
        if state.get("ready") and (batcher is None or not batcher.healthy):
            raise RuntimeError("the replica's batch worker is not running")


REPLICA_HEADER = b"x-corom-replica"


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests): the pid alone
        return "local"


def _tagged(app, tag: str):
    """`app`, whose answers say which replica (Ray id / pid) gave them: for logs, load checks and tests."""
    value = tag.encode()

    async def tagged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def tagging_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, value)]}
            await send(message)

        await app(scope, receive, tagging_send)

    return tagged


def deployment_options(config: RayServeConfig) -> dict[str, Any]:
    """The Ray Serve deployment options for `config` (a pure function: tested without Ray)."""
    r = config.ray
    actor: dict[str, Any] = {"num_cpus": r.replica_cpus}
    if r.replica_gpus:
        actor["num_gpus"] = r.replica_gpus
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": r.max_ongoing,
        # over the connection bound the proxy answers 503 (as uvicorn does for corom serve)
        "max_queued_requests": config.server.max_connections,
        "graceful_shutdown_timeout_s": config.drain_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        # a load that fails fails the same way again: give up soon, with its reason
        "max_constructor_retry_count": max(1, r.most_replicas),
    }
    if r.autoscale:
        options["autoscaling_config"] = {"min_replicas": r.autoscale[0], "max_replicas": r.autoscale[1],
                                         "target_ongoing_requests": r.target_ongoing}
    else:
        options["num_replicas"] = r.replicas
    return options


def build_app(config: RayServeConfig):
    """The Ray Serve application (`serve.run(build_app(cfg), route_prefix="/")`)."""
    serve = import_serve()
    ingress = serve.ingress()(CoromReplica)  # late-bound: each replica builds its app after loading
    return serve.deployment(name=DEPLOYMENT, **deployment_options(config))(ingress).bind(config)


def ray_settings_from_args(args) -> RaySettings:
    """The `--ray` flags, checked (pure: a bad one fails before Ray or the model is touched)."""
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    if autoscale and args.replicas is not None:
        raise InvalidInputError("give --replicas N or --autoscale MIN:MAX, not both")
    return RaySettings(replicas=1 if args.replicas is None else args.replicas, autoscale=autoscale,
                       target_ongoing=args.target_ongoing, replica_cpus=args.replica_cpus,
                       replica_gpus=args.replica_gpus, max_ongoing=args.max_ongoing, address=args.ray_address)


def config_from_args(args) -> RayServeConfig:
    """`corom serve`'s parsed flags -> the config (the same settings `corom serve` builds)."""
    ray = ray_settings_from_args(args)
    from corom_runtime.serving.app import server_settings_from_args

    server = server_settings_from_args(args)
    spec = ModelSpec(str(args.model), args.variant, args.device, args.threads, args.allow_fallback,
                     getattr(args, "fidelity", None))
    return RayServeConfig(spec, server, ray, drain_s=server.drain_s or 60.0)


def app_builder(args: Mapping[str, Any]):
    """For `serve run corom_runtime.serving.ray_serve:app_builder model=NAME replicas=2` and a KubeRay
    RayService's `import_path`: `args` are `corom serve` flags by name (dashes or underscores), parsed
    by `corom serve`'s own flags (cli_args.serve_args), so each keeps its meaning and default."""
    import argparse

    from corom_runtime.cli_args import serve_args  # not the CLI: it imports this module for --ray

    parser = argparse.ArgumentParser(prog="corom serve")
    serve_args(parser)
    argv = ["--ray"]
    for key, value in dict(args).items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    parsed = parser.parse_args(argv)
    return build_app(config_from_args(parsed))


# -- the proxy: Ray's own errors in our shape, and corom serve's connection guards -------------------------


def proxy_env(server) -> dict[str, str]:
    """Environment for Ray's proxy process: our callback, and the settings it applies there."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
            PROXY_ENV: json.dumps({"header_timeout_s": server.header_timeout_s,
                                   "max_header_bytes": server.max_header_bytes,
                                   "max_connections": server.max_connections})}


# What the proxy itself answers, rewritten: (status from the proxy) -> (status we answer, message)
PROXY_ERRORS: dict[int, tuple[int, str]] = {
    500: (503, "the replica holding this request failed (killed or crashed) before answering: retry; "
               "the other replicas are serving and a replacement is starting"),
    503: (503, "no replica can take this request now (all busy, starting or stopping): retry later"),
    408: (408, "the request timed out in the Ray proxy"),
    # route "/" takes every path: the proxy finds no route only while no application is deployed
    404: (503, "the server is starting or stopping: retry"),
}


class ProxyErrors:
    """ASGI middleware in Ray's proxy: an error the proxy wrote itself (not JSON: our app's are) leaves in
    the server's one JSON error shape, through `http_errors.error_body`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rewriting: list[int] = []
        started = False

        async def reshaping_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if status >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    rewriting.append(status)
                    return
            elif rewriting and message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                status, text = PROXY_ERRORS.get(rewriting[0], (rewriting[0], "error in the Ray proxy"))
                # no application (stopping): the client should not keep this connection, the proxy is next
                await _send_error(send, status, text, close=rewriting[0] == 404)
                return
            await send(message)

        try:
            await self.app(scope, receive, reshaping_send)
        except Exception:  # noqa: BLE001 - the proxy failed this request: it still gets an answer
            log.exception("the Ray proxy failed a request")
        if not started:
            # Ray's proxy answers a replica lost under the request by sending nothing (uvicorn would
            # then write a plain-text 500): the one JSON shape, as a retryable 503
            await _send_error(send, *PROXY_ERRORS[500])


async def _send_error(send, status: int, message: str, close: bool = False) -> None:
    from corom_runtime.serving.http_errors import error_body

    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_callback():
    """Run by Ray inside each proxy process (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the error
    middleware, and `corom serve`'s head timeout, head bound and connection bound on the proxy's uvicorn."""
    from starlette.middleware import Middleware

    settings = json.loads(os.environ.get(PROXY_ENV) or "{}")
    if settings:
        _guard_proxy_uvicorn(settings)
    return [Middleware(ProxyErrors)]


def _guard_proxy_uvicorn(settings: dict) -> None:
    # Ray builds the proxy's uvicorn.Config in ray.serve._private.http_util without a protocol choice:
    # give it ours (checked against Ray 2.60-2.63, the [ray] extra's range; otherwise left as Ray has it)
    try:
        from ray.serve._private import http_util

        import uvicorn

        from corom_runtime.serving.runner import guarded_protocol
    except ImportError as exc:  # pragma: no cover - the extras are there where this runs
        log.warning("proxy keeps Ray's own HTTP protocol: %s", exc)
        return
    base = uvicorn.Config
    protocol = guarded_protocol(float(settings["header_timeout_s"]), int(settings["max_header_bytes"]))

    class GuardedConfig(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):
            kw.setdefault("http", protocol)
            kw.setdefault("limit_concurrency", int(settings["max_connections"]))
            super().__init__(*a, **kw)

    if getattr(http_util, "uvicorn", None) is uvicorn:
        http_util.uvicorn = _Namespace(uvicorn, Config=GuardedConfig)
    else:
        log.warning("proxy keeps Ray's own HTTP protocol: ray.serve._private.http_util changed")


class _Namespace:
    """A module seen through, with some names replaced (only inside Ray's proxy module)."""

    def __init__(self, module, **replaced) -> None:
        self._module, self._replaced = module, replaced

    def __getattr__(self, name: str):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


# -- running it: `corom serve --ray` ---------------------------------------------------------------------


def import_serve():
    try:
        from ray import serve
    except ImportError as exc:
        raise CoromError(f"{RAY_HINT} ({exc})") from exc
    return serve


def precheck_model(spec: ModelSpec) -> None:
    """Refuse an unknown model before Ray starts (replicas would fail with the same reason, later). A
    preset not exported yet is exported here once, under the cache lock, so local replicas find it."""
    from corom_runtime.embedder import artifact_or_export

    artifact_or_export(spec.model, export_missing=True)


def start(config: RayServeConfig, host: str, port: int, *, ray_init: Mapping[str, Any] | None = None,
          route_prefix: str = "/") -> None:
    """Start Ray (or join it), check the layout fits, deploy and wait until every replica answers.
    Raises `CoromError` with the replica's reason when the application cannot become healthy."""
    serve = import_serve()
    import ray

    for key, value in proxy_env(config.server).items():
        os.environ[key] = value  # a local Ray's processes inherit this process's environment
    if not ray.is_initialized():
        init: dict[str, Any] = {"address": config.ray.address, "include_dashboard": False,
                                "logging_level": logging.WARNING, "log_to_driver": os.environ.get("COROM_RAY_LOGS") == "1"}
        init.update(ray_init or {})
        ray.init(**init)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    check_fits(config.ray, nodes, fixed_cluster=config.ray.address is None)
    # on a cluster a proxy per node (put a load balancer in front): one proxy is one Python process,
    # whose CPU per request bounds the whole application (benchmarks/results/ray-serve)
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": 5},
                proxy_location="HeadOnly" if config.ray.address is None else "EveryNode")
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix=route_prefix, blocking=False)
    except RuntimeError as exc:
        raise CoromError(f"the replicas could not start: {_reason(_deployment_message(serve) or str(exc))}") from exc


def _deployment_message(serve) -> str:
    """Ray's record of why the deployment failed (the replica's traceback), or ''."""
    try:
        return serve.status().applications[APP_NAME].deployments[DEPLOYMENT].message or ""
    except Exception:  # noqa: BLE001 - a reason is a courtesy: the RuntimeError still says it failed
        return ""


def _reason(text: str) -> str:
    """The last meaningful line of a replica's traceback, as Ray relays it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "Error(" in line]
    return (errors[-1] if errors else lines[-1] if lines else text)[:600]


def stop() -> None:
    """Drain and stop the application (replicas finish what they hold), then Ray if we started it."""
    serve = import_serve()
    import ray

    if not ray.is_initialized():  # stopped already
        return
    try:
        if not _serve_running(serve):  # refused before deploying: nothing to drain
            return
        # the application first: each replica finishes what it holds (Ray waits for its requests, then
        # our lifespan drains the batcher) while the proxy still carries the answers back; requests
        # arriving meanwhile get 503. Shutting Serve down at once would close the proxy's connections
        # under requests in flight (measured: 'Server disconnected without sending a response').
        serve.delete(APP_NAME, _blocking=True)
        # Ray kills its proxy outright (its shutdown is a no-op): first let it answer stragglers with a
        # 503 that closes their connection, so only a request sent in the instant of the kill is cut
        time.sleep(PROXY_GRACE_S)
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _serve_running(serve) -> bool:
    try:
        serve.status()
    except Exception:  # noqa: BLE001 - RayServeException: no Serve instance on this cluster
        return False
    return True


def local_resources() -> dict[str, float]:
    """What a local Ray started by `start` gets: the CPUs this process may use (cgroup/affinity aware)."""
    from corom_runtime.machine import available_cpus

    return {"CPU": float(available_cpus())}


def serve_on_ray(args) -> int:
    """`corom serve --ray`: run until SIGTERM/SIGINT, then drain. Exit status 0 after a drain."""
    config = config_from_args(args)  # every flag checked before anything starts
    ray_init: dict[str, Any] = {}
    if config.ray.address is None:  # a local Ray: its size is known before starting it
        ray_init["num_cpus"] = int(local_resources()["CPU"])
        check_fits(dataclasses.replace(config.ray, replica_gpus=0.0), [local_resources()], fixed_cluster=True)
    precheck_model(config.model)
    if config.ray.address is None and args.host not in ("127.0.0.1", "localhost", "::1") \
            and config.server.api_key is None:
        log.warning("binding %s without an API key: anyone who can reach it can use it", args.host)
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start(config, args.host, args.port, ray_init=ray_init)
        print(f"corom serve --ray: {config.ray.most_replicas} replica(s) of {config.model.model} on "
              f"http://{args.host}:{args.port}", flush=True)
        stopping.wait()
        log.info("signal: draining the replicas (up to %.0fs)", config.drain_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop()
    return 0
