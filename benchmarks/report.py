"""Markdown tables and a PNG plot of a benchmark result."""

from __future__ import annotations

from pathlib import Path

WORKLOAD_TITLE = {"mixed": "short mix", "long": "long passages"}


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ok(systems: dict) -> dict:
    return {n: s for n, s in systems.items() if not s.get("error")}


def markdown(result: dict) -> str:
    hw, config = result["hardware"], result["config"]
    lines = [
        f"Measured {hw['date']} on {hw['cpu']} ({hw['cpus_usable']} usable CPUs, {hw['threads']} threads), "
        f"onnxruntime {hw['versions'].get('onnxruntime')}, openvino {hw['versions'].get('openvino')}, "
        f"torch {hw['versions'].get('torch')}; {config['passages']} passages per workload, batch "
        f"{config['batch_size']}, max length {config.get('max_length', 128)}, median of {config['rounds']} interleaved rounds; "
        f"`variant=\"auto\"` picked {config.get('default_system')}.",
    ]
    for w in config["workloads"]:
        c = config[w]
        given = w == "mixed"
        lines += ["", f"**{WORKLOAD_TITLE[w]}** ({c['mean_tokens']:.0f} tokens on average, {c['min_tokens']}-"
                      f"{c['max_tokens']}; top-10 agreement of {config['queries']} queries against the passages):", "",
                  "| system | sorted sent/s | " + ("given-order sent/s | " if given else "") +
                  "tokens/s | vs PyTorch | min cos | top-10 | % of peak |",
                  "| --- | ---: | " + ("---: | " if given else "") + "---: | ---: | ---: | ---: | ---: |"]
        for name, s in result["systems"].items():
            if s.get("error"):
                lines.append(f"| {name} | failed: {s['error'][:100]} |")
                continue
            st = s["workloads"].get(w, {})
            q = st.get("quality", {})
            lines.append(
                f"| {name} | {_f(st.get('sorted_sent_per_s'), '.0f')} | "
                + (f"{_f(st.get('given_sent_per_s'), '.0f')} | " if given else "")
                + f"{_f(st.get('tokens_per_s'), '.0f')} | {_f(st.get('speedup_vs_reference'), '.2f')}x | "
                f"{_f(q.get('min_cosine'), '.4f')} | {_f(q.get('top10_agreement'), '.3f')} | "
                f"{_f(st.get('fraction_of_peak'), '.1%')} |")
    lines += ["", "Per system: one ~13-token query (latency), batch invariance (min cosine of 32 long passages "
                  "alone vs inside batches of 16), STSb dev Spearman, start-up in a fresh process (second start, "
                  "caches warm; first start in brackets) and its peak RSS:", "",
              "| system | p50 ms | p99 ms | batch invariance | STSb | start s | peak RSS MB | note |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, s in _ok(result["systems"]).items():
        lat, cold = s.get("latency", {}), s.get("cold_start", {})
        start = _f(cold.get("wall_s"), ".2f") + (f" ({cold['first_start_wall_s']:.2f})" if cold.get("first_start_wall_s") else "")
        lines.append(f"| {name} | {_f(lat.get('p50_ms'), '.2f')} | {_f(lat.get('p99_ms'), '.2f')} | "
                     f"{_f(s.get('batch_invariance'), '.6f')} | {_f(s.get('stsb_spearman'), '.4f')} | {start} | "
                     f"{_f(cold.get('peak_rss_mb'), '.0f')} | {s.get('note', '')} |")
    conc = result.get("concurrency")
    if conc:
        lines += ["", f"Dynamic batching ({config.get('default_system')}, max_batch_size {conc['settings']['max_batch_size']}, "
                      f"max_wait_ms {conc['settings']['max_wait_ms']}; one batch of 32 takes {conc['batch32_compute_ms']:.1f} ms):", "",
                  "| clients | no batching req/s | p50 / p99 ms | dynamic batching req/s | p50 / p99 ms | speedup |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in conc["rows"]:
            d, b = row["no_batching"], row["dynamic_batching"]
            lines.append(f"| {row['clients']} | {d['requests_per_s']:.0f} | {d['p50_ms']:.1f} / {d['p99_ms']:.1f} | "
                         f"{b['requests_per_s']:.0f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {row['speedup']:.2f}x |")
    if result.get("targets"):
        lines += ["", "| target | measured | goal | met |", "| --- | ---: | ---: | :---: |"]
        for name, t in result["targets"].items():
            lines.append(f"| {name} | {_f(t['value'], '.4f')} | {t['op']} {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = _ok(result["systems"])
    workloads = result["config"]["workloads"]
    names = [n for n in systems if all(w in systems[n]["workloads"] for w in workloads)]
    if not names:
        return
    colors = {"reference": "#888888", "peer": "#4C72B0", "corom": "#DD8452"}
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(7 * (len(workloads) + 1), 0.42 * len(names) + 2.2))
    for ax, w in zip(axes, workloads):
        values = [systems[n]["workloads"][w]["sorted_sent_per_s"] for n in names]
        ax.barh(names, values, color=[colors[systems[n]["family"]] for n in names])
        for i, n in enumerate(names):
            q = systems[n]["workloads"][w].get("quality", {})
            if q.get("top10_agreement") is not None:
                ax.text(values[i], i, f" top-10 {q['top10_agreement']:.3f}", va="center", fontsize=8)
        ax.set_xlabel(f"sentences/s, {WORKLOAD_TITLE[w]}, sorted batches of 32 (higher is better)")
        ax.invert_yaxis()
    ax = axes[-1]
    w = workloads[-1]
    for n in names:
        st = systems[n]["workloads"][w]
        q = st.get("quality", {})
        if q.get("top10_agreement") is None:
            continue
        ax.scatter(st["sorted_sent_per_s"], q["top10_agreement"], color=colors[systems[n]["family"]])
        ax.annotate(n, (st["sorted_sent_per_s"], q["top10_agreement"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"sentences/s, {WORKLOAD_TITLE[w]}")
    ax.set_ylabel("top-10 agreement with PyTorch fp32")
    ax.set_title("speed vs fidelity (up and right is better)")
    hw = result["hardware"]
    fig.suptitle(f"all-MiniLM-L6-v2 on {hw['cpu']}, {hw['threads']} threads, {hw['date'][:10]} "
                 "(grey: PyTorch reference, blue: peers, orange: corom-onnx)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
