"""What a training run shows and leaves next to its checkpoint: one line per epoch, the closing summary, the metrics
JSON and a PNG of the curves."""
from __future__ import annotations

import json


def epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']:3d}", f"loss {row['loss']:.4f}", f"{row['triples_per_s']:,.0f} triples/s"]
    for split in ("validation", "test"):
        if split in row:
            parts.append(f"{split} HR@10 {row[split]['hr@10']:.4f} NDCG@10 {row[split]['ndcg@10']:.4f}")
    return "  ".join(parts)


def summary(out: str, metrics: dict) -> str:
    lines = [f"wrote {out} (model_version {metrics['model_version']}), {out}.metrics.json and {out}.curves.png"]
    if "two_stage" in metrics:
        chosen = metrics["two_stage"]["chosen"]
        lines.append(f"chosen on validation: default strategy {chosen.get('strategy', 'two_stage')}; retrieval "
                     f"{chosen['method']} {chosen['params']}, R {chosen['candidates']}, {chosen['blend']} blend, "
                     f"CMN weight {chosen['weight']}")
    if "final" in metrics:
        rows = [("CMN", metrics["final"])] + [(name, m) for name, m in metrics.get("strategies", {}).items()
                                              if name != "full"] + [("TopPop", metrics["toppop"])]
        for name, m in rows:
            s = m["sampled"]
            line = f"{name:9s} sampled HR@10 {s['hr@10']:.4f} NDCG@10 {s['ndcg@10']:.4f}"
            if "full" in m:
                line += f"   full HR@10 {m['full']['hr@10']:.4f} NDCG@10 {m['full']['ndcg@10']:.4f}"
            lines.append(line)
    return "\n".join(lines)


def write_reports(out: str, metrics: dict) -> None:
    with open(out + ".metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    plot_curves(metrics, out + ".curves.png")


def plot_curves(metrics: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["epochs"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if metrics["gmf_epochs"]:
        ax_loss.plot([-len(metrics["gmf_epochs"]) + r["epoch"] for r in metrics["gmf_epochs"]],
                     [r["loss"] for r in metrics["gmf_epochs"]], "o-", color="grey", label="GMF pretraining")
    ax_loss.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], "o-", label="CMN")
    ax_loss.set(xlabel="epoch", ylabel="BPR loss", title="training loss")
    ax_loss.legend()
    for split, style in (("test", "-"), ("validation", "--")):
        tested = [r for r in rows if split in r]
        for key in ("hr@10", "ndcg@10"):
            if tested:
                ax_metric.plot([r["epoch"] for r in tested], [r[split][key] for r in tested], style, marker="o",
                               label=f"{split} {key.upper()}")
    if "toppop" in metrics:
        ax_metric.axhline(metrics["toppop"]["sampled"]["hr@10"], color="grey", ls=":", label="TopPop HR@10")
    ax_metric.set(xlabel="epoch", ylabel="sampled metric", title="leave-one-out, 100 negatives")
    if ax_metric.lines:
        ax_metric.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
