"""The training loss curve of a trained checkpoint (its training.json), for the model card.

python -m kvforge.training.card --model src/kvforge/models/kvforge-mini --out docs/model
"""

import argparse
import json
from pathlib import Path


def plot_loss(record: dict, path: Path, smooth: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss = record["steps"], record["loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.3, label="loss per step")
    if len(loss) >= smooth:
        mean = [sum(loss[i - smooth + 1 : i + 1]) / smooth for i in range(smooth - 1, len(loss))]
        ax.plot(steps[smooth - 1 :], mean, label=f"mean of {smooth} steps")
    copy_steps = record["config"].get("copy_steps", 0)
    if copy_steps:
        ax.axvline(copy_steps, color="grey", linestyle="--", linewidth=1)
        ax.text(copy_steps, max(loss), " stage 2: code + retrieval + copy", va="top",
                fontsize=8)  # fmt: skip
        ax.text(0, max(loss), " stage 1: copying", va="top", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"kvforge-mini training loss ({record['seconds'] / 60:.0f} min on CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    record = json.loads((args.model / "training.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    plot_loss(record, args.out / "loss.png")
    tail = record["loss"][-50:]
    print(json.dumps({"steps": len(record["loss"]), "minutes": record["seconds"] / 60,
                      "final_loss_mean_50": sum(tail) / len(tail),
                      "code_tokens": record["code_tokens"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
