"""Benchmark results: one JSON, one markdown table and PNG plots per scenario."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Plot:
    """A line plot: series label -> (x values, y values)."""

    filename: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]
    logx: bool = False
    logy: bool = False


@dataclass
class Report:
    """What a scenario measured. `results` rows share keys; `ratios` are kvforge vs others."""

    scenario: str
    machine: dict
    settings: dict
    results: list[dict]
    ratios: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    # kvforge and llama.cpp on llama.cpp's own workloads (its tools' shapes), one row each
    versus: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["plots"] = [p.filename for p in self.plots]
        return data


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "—" if value is None else str(value)


def _table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]


def markdown(report: Report) -> str:
    lines = [f"# kvforge bench {report.scenario}", "", *_table(report.results)]
    if report.versus:
        lines += ["", "On llama.cpp's own workloads, side by side:", "", *_table(report.versus)]
    if report.ratios:
        lines += ["", "Ratios:", ""] + [f"- {k}: {_cell(v)}" for k, v in report.ratios.items()]
    if report.notes:
        lines += ["", *[f"- {n}" for n in report.notes]]
    machine = ", ".join(f"{k} {v}" for k, v in report.machine.items())
    settings = ", ".join(f"{k} {v}" for k, v in report.settings.items())
    lines += ["", f"Machine: {machine}.", "", f"Settings: {settings}."]
    lines += ["", *[f"![{p.title}]({p.filename})" for p in report.plots]]
    return "\n".join(lines) + "\n"


def draw(plot: Plot, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        from kvforge.errors import KVForgeError

        raise KVForgeError(
            "kvforge bench draws its plots with matplotlib: pip install 'kvforge[bench]'"
        ) from None

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in plot.series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel)
    if plot.logx:
        ax.set_xscale("log", base=2)
    if plot.logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(report: Report, out_dir: Path) -> list[Path]:
    """Write <scenario>.json, <scenario>.md and the plots into out_dir; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{report.scenario}.json", out_dir / f"{report.scenario}.md"]
    paths[0].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    paths[1].write_text(markdown(report))
    for plot in report.plots:
        draw(plot, out_dir / plot.filename)
        paths.append(out_dir / plot.filename)
    return paths
