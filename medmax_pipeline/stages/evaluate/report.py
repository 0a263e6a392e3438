"""Stage 6: figures and tables for the Snakemake report (self-contained, opens offline).

    medmax report --summary results/scores/score_summary.parquet [--train-metrics train_metrics.parquet] \
        [--coverage coverage.parquet] [--images base=DIR trained=DIR] --output-dir results/report

Writes into the output folder (always the same names, so Snakemake can list them as outputs):
    vqa_accuracy.png   per-task bars, one bar per model (base vs trained), 95% bootstrap error bars
    loss_curve.png     training (and validation) loss by step; a placeholder figure saying why
                       when --train-metrics is not given or has no loss column
    summary.html       the summary table (every model, task, rule set, interval, unjudged count)
    families.html      base and trained side by side for every task family (VQA per rule set,
                       captioning / generation similarity, visual chat and mm_out relative scores)
    family_scores.png  the non-VQA families as bars, base vs trained
    gallery.png        a few generated images per model (the PNGs clip_scores decoded)
    coverage.html      the dataset coverage table, or a note that no coverage artifact was given
    medmax_provenance.json   what the report was made from and its credential: credentialed when
                       any input is (a score summary, the train metrics, the coverage, a PNG folder
                       of clip_scores); the tables then say so at the top
Only figures and tables: no artifact, no absolute path (image names are shown without folders, a
missing input by its file name). No external JS or CSS: inline styles only.

Snakemake's own report (`snakemake --report`) lists every rule's inputs and outputs and the params
of the jobs that made its files: absolute paths of the results folder, the configured inputs (the
credentialed image roots included), the interpreter and Snakemake's source cache. The workflow
passes the written report through scrub_report_file, which puts a placeholder (${results_dir},
${images.credentialed[0].root}, ${python}, ...) in place of each of these paths
(machine_path_placeholders).
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import sys
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from medmax_pipeline.core.artifacts import ArtifactError, describe_input, read_artifact, write_provenance
from medmax_pipeline.core.plots import PlotError, plot_loss
from medmax_pipeline.stages.evaluate.scoring_rules import VQA_TASKS

STYLE = (
    "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
    "th,td{border:1px solid #bbb;padding:3px 6px;text-align:right}th{background:#eee}"
    "td.t{text-align:left}caption{font-weight:bold;text-align:left;padding:4px 0}"
)


class ReportError(ValueError):
    """An input of the report is missing or not what it should be."""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


CREDENTIALED_NOTE = ("Computed from credentialed data (an input of this report is credentialed): keep it on the "
                     "machine that holds the data; do not share it.")


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], caption: str, note: str = "") -> str:
    """A standalone HTML page holding one table; text cells are escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cls = ' class="t"' if not isinstance(v, (int, float)) or isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note_html = f"<p>{html.escape(note)}</p>" if note else ""
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(caption)}</title>"
        f"<style>{STYLE}</style></head><body>{note_html}<table><caption>{html.escape(caption)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></body></html>\n"
    )


def vqa_bar_rows(summary: Sequence[dict[str, Any]], rule_set: str) -> tuple[list[str], dict[str, list[tuple[float, float, float]]]]:
    """Task labels (12 tasks + average, those present) and per model (value, low, high) lists."""
    labels_keys = [(t, q) for t, q in VQA_TASKS] + [("vqa_average", "all")]
    present = {(r["task_name"], r["question_type"]) for r in summary if r["rule_set"] == rule_set}
    keys = [k for k in labels_keys if k in present]
    models = sorted({r["model"] for r in summary if r["rule_set"] == rule_set})
    index = {(r["model"], r["task_name"], r["question_type"]): r for r in summary if r["rule_set"] == rule_set}
    series: dict[str, list[tuple[float, float, float]]] = {}
    for m in models:
        vals = []
        for k in keys:
            r = index.get((m, *k))
            vals.append((math.nan, math.nan, math.nan) if r is None else (r["accuracy"], r["ci_low"], r["ci_high"]))
        series[m] = vals
    return [f"{t}\n{q}" for t, q in keys], series


def plot_vqa_bars(summary: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rule_sets = sorted({r["rule_set"] for r in summary}) or ["-"]
    fig, axes = plt.subplots(len(rule_sets), 1, figsize=(13, 3.6 * len(rule_sets)), squeeze=False)
    for ax, rule_set in zip(axes[:, 0], rule_sets):
        labels, series = vqa_bar_rows(summary, rule_set)
        if not labels:
            ax.text(0.5, 0.5, f"no VQA rows for rule set {rule_set}", ha="center", va="center")
            ax.set_axis_off()
            continue
        x = np.arange(len(labels))
        width = 0.8 / max(1, len(series))
        for j, (model, vals) in enumerate(series.items()):
            v = np.array([a for a, _, _ in vals]) * 100
            lo = np.array([a - b for a, b, _ in vals]) * 100
            hi = np.array([c - a for a, _, c in vals]) * 100
            err = np.nan_to_num(np.vstack([lo, hi]), nan=0.0).clip(min=0)
            ax.bar(x + (j - (len(series) - 1) / 2) * width, np.nan_to_num(v), width, yerr=err, capsize=2, label=model)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"VQA by task, rule set '{rule_set}' (95% bootstrap intervals)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SUMMARY_COLUMNS = ("model", "task_name", "question_type", "rule_set", "metric", "stand_in", "n", "unjudged", "accuracy",
                   "accuracy_judged", "mean_reference_score", "mean_model_score", "stderr", "ci_low", "ci_high",
                   "n_tasks", "note")
FAMILY_COLUMNS = ("family", "task_name", "question_type", "rule_set", "metric", "base", "trained", "n", "note")
NON_VQA_TASKS = ("image_captioning", "image_generation", "visual_chat", "mm_out")
GALLERY_PER_MODEL = 6


def family_of(task: str) -> str:
    return task if task in NON_VQA_TASKS else "vqa"


def family_rows(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, group, rule set, metric) with the base and the trained value side by side.

    Non-VQA families score the same under every rule set, so they are shown once (first rule set).
    """
    rule_sets = sorted({r["rule_set"] for r in summary})
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in summary:
        family = family_of(r["task_name"])
        if family != "vqa" and rule_sets and r["rule_set"] != rule_sets[0]:
            continue
        key = (r["task_name"], r["question_type"], r["rule_set"] if family == "vqa" else "any", r["metric"])
        row = rows.setdefault(key, {"family": family, "task_name": r["task_name"], "question_type": r["question_type"],
                                    "rule_set": key[2], "metric": r["metric"], "base": math.nan, "trained": math.nan,
                                    "n": r["n"], "note": r["note"] or ""})
        if r["model"] in ("base", "trained"):
            row[r["model"]] = r["accuracy"]
    order = {f: i for i, f in enumerate(("vqa", *NON_VQA_TASKS))}
    return sorted(rows.values(), key=lambda r: (order[r["family"]], r["rule_set"], r["task_name"] == "vqa_average",
                                                r["task_name"], r["question_type"]))


def plot_family_scores(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Bars of the non-VQA families (similarities and relative scores), base vs trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r["family"] != "vqa"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 3.8))
    if not rows:
        ax.text(0.5, 0.5, "no captioning, generation, visual chat or mm_out rows", ha="center", va="center")
        ax.set_axis_off()
    else:
        x = np.arange(len(rows))
        for j, model in enumerate(("base", "trained")):
            ax.bar(x + (j - 0.5) * 0.4, np.nan_to_num([r[model] for r in rows]), 0.4, label=model)
        ax.set_xticks(x, [f"{r['task_name']}\n{r['question_type']}\n{r['metric']}" for r in rows], fontsize=6)
        ax.set_ylabel("CLIP cosine / relative score (s2/s1)")
        ax.set_title("Captioning, generation, visual chat and mm_out: base vs trained", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gallery(images: Sequence[tuple[str, Path]], path: Path, per_model: int = GALLERY_PER_MODEL) -> None:
    """A grid: one row per model, its first `per_model` generated PNGs (names only, no folders)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    found = [(model, sorted(Path(folder).glob("*.png"))[:per_model]) for model, folder in images]
    found = [(m, pngs) for m, pngs in found if pngs]
    if not found:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no generated images", ha="center", va="center")
        ax.set_axis_off()
    else:
        cols = max(len(p) for _, p in found)
        fig, axes = plt.subplots(len(found), cols, figsize=(2 * cols, 2.2 * len(found)), squeeze=False)
        for (model, pngs), axrow in zip(found, axes):
            for k, ax in enumerate(axrow):
                ax.set_axis_off()
                if k < len(pngs):
                    with Image.open(pngs[k]) as im:
                        ax.imshow(im.convert("RGB"))
                    ax.set_title(f"{model}: {pngs[k].name}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
COVERAGE_PREFERRED = ("source", "task", "split", "expected", "filled", "missing", "reasons")


def make_report(summary: Sequence[str | Path], output_dir: str | Path, train_metrics: str | Path | None = None,
                coverage: str | Path | Sequence[str | Path] | None = None,
                images: Sequence[tuple[str, str | Path]] = ()) -> list[Path]:
    """Write the figures and tables; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    coverage_paths = [] if coverage is None else [coverage] if isinstance(coverage, (str, Path)) else list(coverage)
    sources = [*summary, *([train_metrics] if train_metrics is not None else []), *coverage_paths, *(d for _, d in images)]
    try:
        entries = [describe_input(p) for p in sources if Path(p).exists()]
    except ArtifactError as exc:
        raise ReportError(str(exc)) from exc
    credentialed = any(e["credential"] == "credentialed" for e in entries)
    warning = CREDENTIALED_NOTE + " " if credentialed else ""
    rows: list[dict[str, Any]] = []
    for path in summary:
        try:
            rows += read_artifact(path, artifact="score_summary").to_pylist()
        except ArtifactError as exc:
            raise ReportError(str(exc)) from exc
    written = []
    plot_vqa_bars(rows, out / "vqa_accuracy.png")
    written.append(out / "vqa_accuracy.png")
    train_rows, why = None, "no --train-metrics given"
    if train_metrics is not None:
        try:
            train_rows = read_artifact(train_metrics, artifact="train_metrics").to_pylist()
        except ArtifactError as exc:
            raise ReportError(str(exc)) from exc
    try:
        plot_loss(train_rows, out / "loss_curve.png", why)
    except PlotError as exc:
        raise ReportError(str(exc)) from exc
    written.append(out / "loss_curve.png")
    ordered = sorted(rows, key=lambda r: (r["rule_set"], r["task_name"] == "vqa_average", r["task_name"], r["question_type"], r["model"]))
    (out / "summary.html").write_text(html_table(
        ordered, SUMMARY_COLUMNS, "Evaluation summary",
        warning + "Values are fractions: accuracy for closed/mcq, judge accuracy or token recall for open questions "
        "(see metric), CLIP cosine for captioning / image generation, relative score s2/s1 (x100 in the "
        "paper) for visual chat and mm_out text. Unjudged items count as wrong in accuracy; accuracy_judged "
        "leaves them out (as the public code did). A metric ending in _stand_in (or _with_stand_ins) was "
        "made by a stand-in for the rule set's own rule; see note.",
    ))
    written.append(out / "summary.html")
    families = family_rows(rows)
    (out / "families.html").write_text(html_table(
        families, FAMILY_COLUMNS, "Base vs trained, every task family",
        warning + "VQA per rule set; the other families score alike under every rule set (rule_set 'any').",
    ))
    written.append(out / "families.html")
    plot_family_scores(families, out / "family_scores.png")
    written.append(out / "family_scores.png")
    plot_gallery([(m, Path(d)) for m, d in images], out / "gallery.png")
    written.append(out / "gallery.png")
    missing = [Path(p).name for p in coverage_paths if not Path(p).exists()]
    if coverage_paths and not missing:
        cov: list[dict[str, Any]] = []
        for path in coverage_paths:  # one coverage artifact per split
            try:
                cov += read_artifact(path, artifact="coverage").to_pylist()
            except ArtifactError as exc:
                raise ReportError(str(exc)) from exc
        columns = [c for c in COVERAGE_PREFERRED if cov and c in cov[0]] + [c for c in (cov[0] if cov else {}) if c not in COVERAGE_PREFERRED]
        page = html_table(cov, columns, "Dataset coverage", warning + ("" if cov else "the coverage artifact has no rows"))
    else:
        why = "no coverage artifact was given" if not coverage_paths else f"coverage artifact {', '.join(missing)} does not exist"
        page = html_table([], ["note"], "Dataset coverage", f"{warning}Coverage not available: {why}.")
    (out / "coverage.html").write_text(page)
    written.append(out / "coverage.html")
    write_provenance(out, "report", inputs=entries)
    return written


# ----------------------------------------------------------------------------------------------
# Machine paths out of Snakemake's report
# ----------------------------------------------------------------------------------------------


def _config_strings(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every string in a nested config (lists as key[i])."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _config_strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _config_strings(v, f"{key}[{i}]")
    elif isinstance(value, str):
        yield key, value


def machine_path_placeholders(config: Mapping[str, Any], workdir: str | Path, named: Mapping[str, str | Path] = {}) -> dict[str, str]:
    """Absolute path -> placeholder for every machine path a report could show: each config value
    that names a path (one with a '/' or a leading '~': absolute, or relative to `workdir`; its real
    path too) becomes ${its.key}, and
    each of `named` (placeholder -> path: the interpreter, the workflow folder, ...) its placeholder.
    Placeholders look like shell variables: no '<' that an HTML view would take for a tag. The file
    system root alone is never replaced."""
    out: dict[str, str] = {}

    def add(path: str | Path, placeholder: str) -> None:
        path = os.path.expanduser(str(path))
        if "\x00" in path or "://" in path:  # not a file path (a URL: the judge's base_url)
            return
        absolute = os.path.normpath(os.path.join(str(workdir), path))
        for variant in (absolute, os.path.realpath(absolute)):
            if variant != os.sep:
                out.setdefault(variant, placeholder)

    for key, value in _config_strings(config):
        if os.sep in value or value.startswith("~"):
            add(value, "${" + key + "}")
    for placeholder, path in named.items():
        add(path, placeholder)
    return out


def scrub_machine_paths(text: str, placeholders: Mapping[str, str]) -> str:
    """`text` with each path of `placeholders` (as it is, HTML-escaped or URL-quoted) replaced by its
    placeholder, longest first, only where it is a whole path or a path's leading part."""
    variants: dict[str, str] = {}
    for path, placeholder in placeholders.items():
        for spelled in (path, html.escape(path), urllib.parse.quote(path), path.replace("\\", "\\\\")):
            variants.setdefault(spelled, placeholder)
    for spelled in sorted(variants, key=len, reverse=True):
        pattern = rf"(?<![\w.\-/%]){re.escape(spelled)}(?![\w.\-])"
        text = re.sub(pattern, lambda m, p=variants[spelled]: p, text)
    return text


def scrub_report_file(path: str | Path, placeholders: Mapping[str, str]) -> None:
    """Scrub Snakemake's report in place: the .html itself, or the report.html inside a .zip report
    (its other members are result files, written by the stages without machine paths)."""
    path = Path(path)
    if path.suffix != ".zip":
        path.write_text(scrub_machine_paths(path.read_text(encoding="utf-8"), placeholders), encoding="utf-8")
        return
    tmp = path.with_name(f".{path.name}.scrub.tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/report.html"):
                data = scrub_machine_paths(data.decode("utf-8"), placeholders).encode("utf-8")
            dst.writestr(info, data)
    os.replace(tmp, path)


def scrub_reports_of(workflow: Any, config: Mapping[str, Any], results_dir: str) -> None:
    """Make a Snakefile's `workflow` scrub each report it writes (`snakemake --report FILE`): its
    create_report is wrapped, so this runs only when a report is made. The paths: every path in the
    config, the results folder, the interpreter and its environment, the workflow and working
    folders, the home folder, Snakemake's source cache (where it keeps copies of workflow files)."""
    create_report = workflow.create_report

    def create_report_without_machine_paths(*args: Any, **kwargs: Any) -> Any:
        done = create_report(*args, **kwargs)
        settings = kwargs.get("report_settings", args[1] if len(args) > 1 else None)
        if getattr(settings, "path", None) is not None:
            cache = workflow.sourcecache
            named = {
                "${results_dir}": results_dir,  # a plain folder name ("results") too
                "${python}": sys.executable,
                "${python_prefix}": sys.prefix,
                "${workflow}": workflow.basedir,
                "${workdir}": os.getcwd(),
                "${home}": Path.home(),
                "${snakemake_source_cache}": Path(cache.runtime_cache_path) / "file",
                "${snakemake_cache}": cache.cache_path,
            }
            scrub_report_file(settings.path, machine_path_placeholders(config, os.getcwd(), named))
        return done

    workflow.create_report = create_report_without_machine_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", nargs="+", required=True, help="score_summary artifacts (one per rule set)")
    parser.add_argument("--train-metrics", help="train_metrics artifact of the training stage")
    parser.add_argument("--coverage", nargs="*", default=None, help="coverage artifacts of the assembly stage, one per split (optional)")
    parser.add_argument("--images", nargs="*", default=[], help="MODEL=DIR folders of generated PNGs (clip_scores)")
    parser.add_argument("--output-dir", required=True)


def run(args: argparse.Namespace) -> int:
    images = []
    for item in args.images:
        model, sep, folder = item.partition("=")
        if not sep:
            raise ReportError(f"--images {item!r}: expected MODEL=DIR")
        images.append((model, folder))
    written = make_report(args.summary, args.output_dir, args.train_metrics, args.coverage, images)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
