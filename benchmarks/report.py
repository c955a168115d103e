"""Markdown table and PNG plot of a benchmark result."""

from __future__ import annotations

from pathlib import Path


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [
        f"Measured {hw['date']} on {hw['cpu']} ({hw['cpus_usable']} usable CPUs, {hw['threads']} threads), "
        f"onnxruntime {hw['versions'].get('onnxruntime')}, torch {hw['versions'].get('torch')}; "
        f"{result['config']['passages']} passages, batch {result['config']['batch_size']}, "
        f"max length 128, median of {result['config']['rounds']} interleaved rounds.",
        "",
        "| system | mixed sent/s | sorted sent/s | tokens/s | vs PyTorch | p50 ms | p99 ms | cold start s | peak RSS MB | min cos | top-10 | STSb | % of peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in result["systems"].items():
        if s.get("error"):
            lines.append(f"| {name} | failed: {s['error'][:80]} |" + " |" * 12)
            continue
        lat, cold, q = s.get("latency", {}), s.get("cold_start", {}), s.get("quality", {})
        lines.append(
            f"| {name} | {_f(s.get('mixed_sent_per_s'), '.0f')} | {_f(s.get('sorted_sent_per_s'), '.0f')} | "
            f"{_f(s.get('mixed_tokens_per_s'), '.0f')} | {_f(s.get('speedup_vs_reference'), '.2f')}x | "
            f"{_f(lat.get('p50_ms'), '.2f')} | {_f(lat.get('p99_ms'), '.2f')} | {_f(cold.get('wall_s'), '.2f')} | "
            f"{_f(cold.get('peak_rss_mb'), '.0f')} | {_f(q.get('min_cosine'), '.4f')} | {_f(q.get('top10_agreement'), '.3f')} | "
            f"{_f(q.get('stsb_spearman'), '.4f')} | {_f(s.get('fraction_of_peak'), '.1%')} |"
        )
    conc = result.get("concurrency")
    if conc:
        lines += ["", f"Dynamic batching (corom-int8, max_batch_size {conc['settings']['max_batch_size']}, "
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
            lines.append(f"| {name} | {_f(t['value'], '.3f')} | {t['op']} {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in result["systems"].items() if not s.get("error") and s.get("mixed_sent_per_s")]
    if not names:
        return
    systems = result["systems"]
    colors = {"reference": "#888888", "peer": "#4C72B0", "corom": "#DD8452"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(names) + 2))
    ax = axes[0]
    values = [systems[n]["mixed_sent_per_s"] for n in names]
    ax.barh(names, values, color=[colors[systems[n]["family"]] for n in names])
    for i, n in enumerate(names):
        q = systems[n].get("quality", {})
        label = f" top-10 {q['top10_agreement']:.3f}" if q.get("top10_agreement") is not None else ""
        ax.text(values[i], i, label, va="center", fontsize=8)
    ax.set_xlabel("sentences/s, 2,000 mixed-length passages (higher is better)")
    ax.invert_yaxis()
    ax = axes[1]
    lat = [systems[n].get("latency", {}).get("p50_ms") or 0 for n in names]
    ax.barh(names, lat, color=[colors[systems[n]["family"]] for n in names])
    ax.set_xlabel("single short query, p50 ms (lower is better)")
    ax.invert_yaxis()
    hw = result["hardware"]
    fig.suptitle(f"all-MiniLM-L6-v2 on {hw['cpu']}, {hw['threads']} threads, {hw['date'][:10]} "
                 "(grey: PyTorch reference, blue: peers, orange: corom-onnx)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
