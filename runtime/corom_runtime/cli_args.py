"""The flags `corom serve` shares with other modules: the model flags every model command takes, and
the server's own (with --ray's). Apart from cli.py so that `serving.ray_serve.app_builder` parses its
args with the very same flags without importing the CLI (cli imports ray_serve for `serve --ray`)."""

from __future__ import annotations

import argparse

from corom_runtime.artifacts.presets import DEFAULT_PRESET
from corom_runtime.catalog import DEFAULT_FIDELITY, DEVICES, TIERS, VARIANTS, device_names, variant_names


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_PRESET,
                   help=f"artifact folder written by `corom export`, or a preset name (its artifact in the user "
                        f"cache, exported there on first use when the exporter is installed; see `corom presets`) "
                        f"(default: {DEFAULT_PRESET})")
    p.add_argument("--variant", default="auto", choices=["auto", *variant_names()],
                   help="which variant to run; auto = the fastest that passed its gate on this machine "
                        "(as `corom verify` measured it). "
                        + "; ".join(f"{v.name}: {v.engine} {v.precision} on {'/'.join(v.devices)}"
                                    for v in VARIANTS.values()))
    p.add_argument("--fidelity", default=None, choices=["auto", *TIERS],
                   help=f"the fidelity tier auto serves: the fastest variant that passed it (auto: "
                        f"{DEFAULT_FIDELITY}; a tier includes the variants of every stricter one). "
                        + "; ".join(f"{t.name}: {t.description}" for t in TIERS.values()).replace("%", "%%"))
    p.add_argument("--device", default="auto", choices=device_names(),
                   help="auto = the first accelerator present, else the CPU. "
                        + "; ".join(f"{d.name}: {d.description}" for d in DEVICES.values()))
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: the CPUs this process may use, cgroup/affinity aware)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="run on the CPU (with a warning) when the asked-for GPU provider is absent")


def serve_args(p: argparse.ArgumentParser) -> None:
    """`corom serve`'s flags: the model's, the server's, and --ray's."""
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most texts in one inference (default 32)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="most padded tokens in one inference")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a free worker lingers for a fuller batch (default 0: take what is queued; "
                        "raise it on GPUs, where bigger batches cost little more)")
    p.add_argument("--max-queue", type=int, default=4096, help="queued texts before answering 503 overloaded")
    p.add_argument("--inline-max-tokens", type=int, default=512,
                   help="a request alone in flight, of at most this many padded tokens (texts x longest), that "
                        "finds the batcher idle runs at once on the server's event loop instead of being handed "
                        "to the batch worker (saves ~0.15 ms); 0 sends every request through the worker "
                        "(default 512)")
    p.add_argument("--inline-max-ms", type=float, default=2.0,
                   help="...and only when its inference, estimated from the speed measured at start, takes at "
                        "most this many milliseconds: it holds the event loop (and /health) meanwhile (default 2)")
    p.add_argument("--max-items", type=int, default=2048,
                   help="most texts in one request (default 2048, OpenAI's limit; at most --max-queue)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY`; prefer the COROM_API_KEY environment variable, "
                        "which other users cannot read in `ps`")
    p.add_argument("--public-health", action="store_true",
                   help="with a key set, let /health (full) and /metrics answer without it "
                        "(default: without the key /health says only ok/unavailable and /metrics refuses)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host header to accept (repeatable); default on a loopback bind: 127.0.0.1, "
                        "localhost, ::1 (guards against DNS rebinding); default elsewhere: any")
    p.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                   help="a browser Origin allowed to call the server (repeatable), e.g. https://app.example")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a client may take to send its body (default 10; 408 after)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request head (default 10; closed after)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections and requests at once; beyond it new requests get 503 (default 512)")
    p.add_argument("--drain-seconds", type=float, default=None,
                   help="on SIGTERM, how long accepted requests may take before the rest get 503 "
                        "(default: a full queue at the rate measured at start, 10 s to 10 min)")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per request (off by default: it costs ~0.2 ms a request; /metrics counts them)")
    # -- --ray: the same server on Ray Serve (serving/ray_serve.py); every flag above keeps its meaning
    r = p.add_argument_group("Ray Serve (--ray)")
    r.add_argument("--ray", action="store_true",
                   help="serve through a Ray Serve application: Ray's proxy on --host/--port in front of replicas "
                        "that each run this server's app, model and batcher (needs the [ray] extra)")
    r.add_argument("--replicas", type=int, default=None, help="fixed number of replicas (default 1)")
    r.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="let Ray scale between MIN and MAX replicas on load (instead of --replicas)")
    r.add_argument("--target-ongoing", type=float, default=16.0,
                   help="with --autoscale: requests in flight per replica that Ray aims at (default 16)")
    r.add_argument("--max-ongoing", type=int, default=64,
                   help="requests one replica holds at once; more wait in the proxy (default 64)")
    r.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs each replica reserves, fractions allowed; its threads default to the whole "
                        "CPUs among them, at least 1 (default 1)")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each replica reserves, fractions allowed")
    r.add_argument("--ray-address", default=None,
                   help="Ray to use: default starts a local one; 'auto' joins the cluster this node belongs to")
