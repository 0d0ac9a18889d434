"""Plots (matplotlib is optional: the `experiment` extra). Each returns the path written, or None."""
from __future__ import annotations

from pathlib import Path


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pareto(results: dict, out: Path) -> Path:
    """Gain (SymPy bpb drop) vs forgetting (stacked base bpb rise) along the steps, per arm."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, arm in results["finetune"]["arms"].items():
        curve = arm["curve"]
        fx = [p["forgetting"] for p in curve]
        gy = [p["gain"] for p in curve]
        line, = ax.plot(fx, gy, marker="o", label=name)
        ax.annotate(str(curve[-1]["step"]), (fx[-1], gy[-1]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color=line.get_color())
    ax.axvline(0.014, color="grey", ls=":", lw=1)
    ax.text(0.014, ax.get_ylim()[0], " 1 % byte ppl", color="grey", fontsize=8, va="bottom")
    ax.axvline(0, color="black", lw=0.5)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("forgetting: base-val bpb - P (stacked banks)")
    ax.set_ylabel("gain: P - SymPy-val bpb")
    ax.set_title("Fine-tuning on SymPy: gain vs forgetting along the steps")
    ax.legend()
    return _save(plt, fig, out / "gain_vs_forgetting.png")


def session_curve(results: dict, out: Path) -> Path:
    """bpb of the eval spans vs session size M, with the wrong-document control."""
    plt = _plt()
    s = results["session"]
    mems = results["config"]["mems"]
    xs = [max(m, 1) for m in mems]
    ys = [s["bpb"][f"M={m}"] for m in mems]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.plot(xs, ys, marker="o", label="own document's memory")
    wrong = s["bpb"][s["settings"][-1]]
    ax.axhline(wrong, color="tab:red", ls="--", label=s["settings"][-1] + " (another document)")
    ax.axhline(s["bpb"]["no-episodic"], color="grey", ls=":", label="model before phase S")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(m) for m in mems])
    ax.set_xlabel("session memory M (rows = byte positions); 0 plotted at 1")
    ax.set_ylabel("bpb on the eval spans")
    ax.set_title(f"Session memory on {len(s['docs'])} long documents ({s['scored_bytes']:,} bytes)")
    ax.legend()
    return _save(plt, fig, out / "session_memory.png")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
