"""PNG plots of a benchmark result (matplotlib, optional: skipped with a message without it).

- <stem>-latency.png: median total seconds per method, one bar per backend (diffusers included),
  one panel per batch size; the whisker goes up to the p95.
- <stem>-throughput.png: images/s against batch size, one panel per backend, one line per method.
"""

from __future__ import annotations

from pathlib import Path


def make_plots(result: dict, out_dir: Path, stem: str) -> tuple[list[Path], str | None]:
    """(written files, message when skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [c for c in result["cases"] if c.get("status") == "ok"]
    if not ok:
        return [], "plots skipped: no case ran"
    out_dir = Path(out_dir)
    title = (f"{result['device'].get('name')} | {result.get('models', {}).get('preset')} "
             f"{result.get('models', {}).get('dtype')} | {result['sampling']['steps']} steps "
             f"{result['sampling']['height']}x{result['sampling']['width']}")
    backends = list(dict.fromkeys(c["backend"] for c in ok))
    variants = list(dict.fromkeys(c["variant"] for c in ok))
    batches = sorted({c["batch"] for c in ok})
    by = {(c["backend"], c["variant"], c["batch"]): c for c in ok}
    files = []

    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches) + 1, 4.2), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, batch in zip(axes[0], batches):
        for j, backend in enumerate(backends):
            xs, med, up = [], [], []
            for i, variant in enumerate(variants):
                c = by.get((backend, variant, batch))
                if c is None:
                    continue
                st = c["stages_s"]["total_s"]
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                med.append(st["median"])
                up.append(max(st["p95"] - st["median"], 0.0))
            if xs:
                ax.bar(xs, med, width, yerr=[[0] * len(up), up], capsize=2, label=backend)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.set_ylabel("median seconds per call (whisker: p95)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("latency by backend and method: " + title, fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{stem}-latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)

    fig, axes = plt.subplots(1, len(backends), figsize=(4.2 * len(backends) + 1, 4), squeeze=False, sharey=True)
    for ax, backend in zip(axes[0], backends):
        for variant in variants:
            pts = [(b, by[(backend, variant, b)]["images_per_s"]) for b in batches if (backend, variant, b) in by]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch size (mixed identities)")
        ax.set_title(backend, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("images / s")
    fig.suptitle("throughput vs batch: " + title, fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{stem}-throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return files, None
