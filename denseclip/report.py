"""Evaluation reports: report.json, Markdown tables in the paper's layout, a confusion heatmap, overlay grids
and one self-contained HTML page that shows them all offline; the robustness sweep's tables and plot.

``write_report`` is the one entry point for one method's evaluation; the evaluation pipeline, the training stage
and the demo all call it with a ``summary`` from ``denseclip.metrics.summarize`` (optionally with extra keys:
``dataset`` and ``method`` name the row in the paper tables, ``inputs`` is a dict shown as run information).
``write_comparison`` puts several methods' summaries and the same scenes under each of them on one page.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import jinja2
import numpy as np
from matplotlib.figure import Figure

from denseclip.metrics import ConfusionMatrix
from denseclip.shards import sanitize_key
from denseclip.visualize import colorize, comparison_grid, label_panels

Sample = tuple[str, "np.ndarray | None", np.ndarray, np.ndarray]  # (key, image (H,W,3) | None, gt (H,W), pred (H,W))
# (key, image (H,W,3), gt (H,W), {method: pred (H,W)}): one scene under several methods
Scene = tuple[str, np.ndarray, np.ndarray, Mapping[str, np.ndarray]]
Table = tuple[str, list[str], list[list[str]]]  # (heading, header, rows) of plain text cells

_HEADLINE = [("miou", "mIoU"), ("miou_seen", "mIoU(S)"), ("miou_unseen", "mIoU(U)"), ("hiou", "hIoU"),
             ("pixel_accuracy", "pAcc"), ("pixel_accuracy_seen", "pAcc(S)"), ("pixel_accuracy_unseen", "pAcc(U)"),
             ("mean_accuracy", "mAcc")]


def write_report(out_dir: str | Path, summary: dict, conf: ConfusionMatrix, class_names: Sequence[str],
                 palette: np.ndarray, samples: Iterable[Sample] = (),
                 reference: str = "ground truth") -> dict[str, Path]:
    """Write ``report.json``, ``tables.md``, ``confusion.png``, ``overlays/<key>.png`` and ``index.html``
    under ``out_dir`` and return their paths by name (``overlays`` maps to the list of grid files).

    ``summary``: from ``metrics.summarize`` (+ optional ``dataset``, ``method``, ``inputs``); ``conf``: the
    matrix it was computed from; ``palette``: uint8 (K, 3); ``samples``: images to draw as
    image | ground truth | prediction grids (keys are sanitised, so none escapes ``out_dir/overlays``);
    ``reference``: what the scores compare with (the middle panel's title), when it is not ground truth.
    """
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for stale in (out / "overlays").glob("*.png"):  # grids of an earlier run into the same folder
        stale.unlink()
    paths: dict = {"report": out / "report.json", "tables": out / "tables.md",
                   "confusion": out / "confusion.png", "html": out / "index.html", "overlays": []}
    paths["report"].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    results = {summary.get("method", "this run"): {summary.get("dataset", "custom"): summary}}
    paths["tables"].write_text(
        "## Zero-shot segmentation (paper Table 1 layout)\n\n" + table1_markdown(results)
        + "\n## mIoU per dataset (paper Table 3 layout)\n\n" + table3_markdown(results)
        + "\n## Summary\n\n" + headline_markdown(summary)
        + "\n## Per class\n\n" + per_class_markdown(summary), encoding="utf-8")
    plot_confusion(conf, class_names, paths["confusion"])
    for key, image, gt, pred in samples:
        path = out / "overlays" / (sanitize_key(key).replace("/", "__") + ".png")
        comparison_grid(image, gt, pred, class_names, palette, summary.get("unseen_classes", ()),
                        reference).save(path)
        paths["overlays"].append(path)
    paths["html"].write_text(_html_page(summary, class_names, palette, paths, reference), encoding="utf-8")
    return paths


def write_comparison(out_dir: str | Path, summaries: Mapping[str, dict], class_names: Sequence[str],
                     palette: np.ndarray, scenes: Iterable[Scene] = (), *, title: str,
                     labels: Mapping[str, str] | None = None, pages: Mapping[str, str] | None = None,
                     notes: str = "", tables: Sequence[Table] = ()) -> dict[str, Path]:
    """One page comparing methods: ``out_dir/index.html`` with the headline table (each method linking to its
    own page in ``pages``, relative to ``out_dir``), the per-class IoU of every method (seen and unseen), the
    same ``scenes`` under every method (pictures written to ``out_dir/scenes/``), then ``tables``.

    ``summaries``: method -> summary (``metrics.summarize``, with ``unseen_classes``), in display order;
    ``labels``: method -> display name (default: the method key); ``notes``: a paragraph of plain text under the
    title. Returns the paths by name (``html``, ``scenes``: the list of pictures).
    """
    out = Path(out_dir)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    for stale in (out / "scenes").glob("*.png"):
        stale.unlink()
    labels = {m: (labels or {}).get(m, m) for m in summaries}
    unseen = set().union(*(s.get("unseen_classes", ()) for s in summaries.values()))
    paths: dict = {"html": out / "index.html", "scenes": []}
    for key, image, gt, predictions in scenes:
        path = out / "scenes" / (sanitize_key(key).replace("/", "__") + ".png")
        maps = {"ground truth": gt, **{labels[m]: predictions[m] for m in summaries if m in predictions}}
        label_panels(image, maps, class_names, palette, unseen).save(path)
        paths["scenes"].append(path)
    paths["html"].write_text(_comparison_page(summaries, class_names, palette, labels, pages or {}, paths["scenes"],
                                              title, notes, tables, out), encoding="utf-8")
    return paths


def table1_markdown(results: Mapping[str, Mapping[str, dict]]) -> str:
    """Paper Table 1 layout: one row per method, S / U / mIoU / hIoU per dataset.
    ``results[method][dataset]`` is a summary dict; a dataset a method lacks shows as ``-``."""
    return _markdown_table(*_table1(results))


def table3_markdown(results: Mapping[str, Mapping[str, dict]]) -> str:
    """Paper Table 3 layout: one row per method, the mIoU of each dataset as a column."""
    datasets = _datasets(results)
    rows = [[method] + [_fmt(per.get(d, {}).get("miou")) for d in datasets] for method, per in results.items()]
    return _markdown_table(["Method"] + [f"{d} mIoU" for d in datasets], rows)


def headline_markdown(summary: dict) -> str:
    """The headline numbers of one summary as a one-row table."""
    return _markdown_table(*_headline(summary))


def per_class_markdown(summary: dict) -> str:
    """One row per evaluated class: split, IoU, accuracy and ground-truth pixel count."""
    return _markdown_table(*_per_class(summary, lambda name: name))


def plot_confusion(conf: ConfusionMatrix, class_names: Sequence[str], path: str | Path) -> Path:
    """Heatmap of the row-normalised confusion matrix (rows: ground truth, columns: prediction; a last
    "other" column appears when some predictions were outside [0, K)). Classes with no ground truth are blank."""
    counts = conf.matrix.astype(np.float64)
    cols = list(class_names)
    if counts[:, -1].any():
        cols.append("other")
    else:
        counts = counts[:, :-1]
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.ma.masked_invalid(np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0))
    n = len(cols)
    side = min(max(4.0, 2.5 + 0.3 * n), 30.0)
    fontsize = min(10.0, max(3.0, 0.55 * 72 * side / (n + 8)))
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n), cols, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=fontsize)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("Confusion matrix (rows normalised)")
    if n <= 12:
        for (g, p), rate in np.ndenumerate(rates.filled(np.nan)):
            if not math.isnan(rate):
                ax.text(p, g, f"{rate:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="black" if rate > 0.5 else "white")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    fig.savefig(path)
    return Path(path)


def write_robustness_report(out_dir: str | Path, robustness: dict) -> dict[str, Path]:
    """Write ``robustness.json``, ``robustness.md`` (the tables) and ``robustness.png`` (the plot) under
    ``out_dir``; ``robustness`` comes from ``denseclip.robustness.robustness_summary`` (+ optional ``dataset``,
    ``method``, ``inputs``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "robustness.json", "markdown": out / "robustness.md", "plot": out / "robustness.png"}
    paths["json"].write_text(json.dumps(robustness, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(robustness_markdown(robustness), encoding="utf-8")
    plot_robustness(robustness, paths["plot"])
    return paths


def robustness_markdown(robustness: dict) -> str:
    """The sweep as Markdown: mIoU per corruption x severity (paper Table 5 layout), then one row per method
    with the clean mIoU and each corruption's mean over severities (paper Table 4 layout)."""
    severities = sorted({int(s) for values in robustness["miou"].values() for s in values})
    per_severity = [[_corruption_label(c)] + [_fmt(values.get(str(s))) for s in severities]
                    + [_fmt(robustness["mean"][c])] for c, values in robustness["miou"].items()]
    corruptions = list(robustness["miou"])
    means = [[robustness.get("method", "this run"), _fmt(robustness["clean"])]
             + [_fmt(robustness["mean"][c]) for c in corruptions] + [_fmt(robustness["mean_corrupted"])]]
    return (f"## Robustness: mIoU under ImageNet-C corruptions ({robustness.get('dataset', 'custom')}, "
            f"{robustness['num_images']} images)\n\nClean mIoU: {_fmt(robustness['clean'])}\n\n"
            + _markdown_table(["Corruption"] + [f"severity {s}" for s in severities] + ["mean"], per_severity)
            + "\n## Mean over severities (paper Table 4 layout)\n\n"
            + _markdown_table(["Method", "clean"] + [_corruption_label(c) for c in corruptions] + ["mean"], means))


def plot_robustness(robustness: dict, path: str | Path) -> Path:
    """Line plot of mIoU against severity, one line per corruption, the clean mIoU as a dashed line."""
    fig = Figure(figsize=(7.5, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^v<>px"
    for i, (corruption, values) in enumerate(robustness["miou"].items()):
        points = sorted((int(s), v) for s, v in values.items() if v is not None)
        ax.plot([s for s, _ in points], [v for _, v in points], marker=markers[i % len(markers)],
                label=_corruption_label(corruption))
    if robustness["clean"] is not None:
        ax.axhline(robustness["clean"], color="black", linestyle="--", label="clean")
    severities = sorted({int(s) for values in robustness["miou"].values() for s in values})
    ax.set_xticks(severities)
    ax.set_xlabel("severity")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{robustness.get('method', 'this run')} on {robustness.get('dataset', 'custom')}: "
                 "mIoU under corruptions")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.savefig(path)
    return Path(path)


def _corruption_label(name: str) -> str:
    return name.replace("_", " ")


def _datasets(results: Mapping[str, Mapping[str, dict]]) -> list[str]:
    return list(dict.fromkeys(d for per in results.values() for d in per))


def _table1(results: Mapping[str, Mapping[str, dict]]) -> tuple[list[str], list[list[str]]]:
    datasets = _datasets(results)
    header = ["Method"] + [f"{d} {label}" for d in datasets for label in ("S", "U", "mIoU", "hIoU")]
    rows = [[method] + [_fmt(per.get(d, {}).get(k)) for d in datasets
                        for k in ("miou_seen", "miou_unseen", "miou", "hiou")]
            for method, per in results.items()]
    return header, rows


def _headline(summary: dict) -> tuple[list[str], list[list[str]]]:
    return [label for _, label in _HEADLINE], [[_fmt(summary.get(k)) for k, _ in _HEADLINE]]


def _per_class(summary: dict, label: Callable[[str], str | dict]) -> tuple[list[str], list]:
    """Per-class rows; ``label`` renders the class cell (plain name in Markdown, a swatch cell in HTML)."""
    rows = [[label(name), _split(summary, name), _fmt(iou), _fmt(summary["per_class_accuracy"].get(name)),
             str(summary.get("per_class_pixels", {}).get(name, "-"))]
            for name, iou in summary["per_class_iou"].items()]
    return ["Class", "Split", "IoU", "Acc", "GT pixels"], rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _split(summary: dict, name: str) -> str:
    return "unseen" if name in summary.get("unseen_classes", ()) else "seen"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header)] + rows
    return "".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |\n" for line in lines)


def _comparison_page(summaries: Mapping[str, dict], class_names: Sequence[str], palette: np.ndarray,
                     labels: Mapping[str, str], pages: Mapping[str, str], scenes: list[Path], title: str,
                     notes: str, tables: Sequence[Table], out: Path) -> str:
    swatch = _swatch_cell(class_names, palette)
    headline = ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy")
    header = ["Method"] + [label for key, label in _HEADLINE if key in headline]
    rows = [[{"href": pages[m], "text": labels[m]} if m in pages else labels[m]]
            + [_fmt(s.get(k)) for k in headline] for m, s in summaries.items()]
    first = next(iter(summaries.values()))
    per_class = [[swatch(name), _split(first, name)] + [_fmt(s["per_class_iou"].get(name)) for s in summaries.values()]
                 for name in first["per_class_iou"]]
    return _render("comparison.html.j2", title=title, notes=notes, methods=(header, rows),
                   per_class=(["Class", "Split"] + [labels[m] for m in summaries], per_class),
                   scenes=[{"src": p.relative_to(out).as_posix(), "caption": p.stem} for p in scenes],
                   tables=list(tables))


def _html_page(summary: dict, class_names: Sequence[str], palette: np.ndarray, paths: dict,
               reference: str = "ground truth") -> str:
    dataset, method = summary.get("dataset", "custom"), summary.get("method", "this run")
    info = [[str(k), v if isinstance(v, str) else json.dumps(v)] for k, v in summary.get("inputs", {}).items()]
    info += [["images", str(summary.get("num_images"))], ["evaluated pixels", str(summary.get("num_pixels"))],
             ["ignored classes", ", ".join(summary.get("ignored_classes", [])) or "none"]]
    return _render("report.html.j2", dataset=str(dataset), method=str(method), reference=reference,
                   headline=_headline(summary), table1=_table1({method: {dataset: summary}}),
                   per_class=_per_class(summary, _swatch_cell(class_names, palette)),
                   confusion=_png_data_uri(paths["confusion"]), info=info,
                   overlays=[{"src": _png_data_uri(p), "caption": p.stem} for p in paths["overlays"]])


@functools.cache
def _templates() -> jinja2.Environment:
    """The HTML templates (``denseclip/templates``), every value escaped unless a template says otherwise."""
    return jinja2.Environment(loader=jinja2.PackageLoader("denseclip", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _render(template: str, **context) -> str:
    return _templates().get_template(template).render(**context)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _swatch_cell(class_names: Sequence[str], palette: np.ndarray) -> Callable[[str], dict]:
    """``name -> {"swatch": css colour, "text": name}``: a class cell drawn with its colour swatch."""
    colours = colorize(np.arange(len(class_names))[None], palette)[0]
    swatches = {name: "rgb({},{},{})".format(*(int(v) for v in colours[i])) for i, name in enumerate(class_names)}
    return lambda name: {"swatch": swatches[name], "text": name}
