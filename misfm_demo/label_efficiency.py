"""Is pretraining worth it on my data? A label-efficiency study through the segmentation bundles.

For every label budget (a number of labelled cases, a fraction of the training list, or ``all``) and seed, the
bundle is trained twice through ``python -m monai.bundle run`` exactly as users run it: from the pretrained
checkpoint and from scratch, on the same seeded subset of the training list. Each model is then evaluated on the
datalist's validation list by the bundle's ``evaluate.json``. Written to ``--output-dir``:

* ``label_efficiency.csv``: budget, labelled cases, seed, initialisation, per-organ Dice, mean Dice;
* ``label_efficiency.png``: mean Dice against the number of labelled cases, pretrained vs scratch, with the
  spread over seeds;
* ``summary.txt``: the table, the gain per budget and what the numbers do and do not say;
* ``runs/<init>_n<cases>_s<seed>/``: each run's models, logs and metrics.

A killed study continues where it stopped (finished runs are kept, an interrupted training resumes from its
checkpoint). Arguments are checked before any training: a budget larger than the training list, a missing or empty
validation list, a checkpoint of another network are errors.

    python -m misfm_demo.label_efficiency --bundle abdomen --datalist my.json --pretrained model.pt \\
        --budgets 1 2 4 all --seeds 3 [--output-dir outputs/label_efficiency] [--set max_epochs=200 ...]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .bundle_runner import bundle_config, bundle_folder, bundle_network, run_bundle

__all__ = ["Run", "plan_study", "run_study", "parse_overrides", "main"]

INITS = ("pretrained", "scratch")


@dataclass(frozen=True)
class Run:
    """One training + evaluation of the study."""

    init: str  # "pretrained" or "scratch"
    budget: str  # as asked: "all", "4", "0.25"
    cases: int  # labelled cases it trains on
    seed: int

    @property
    def name(self) -> str:
        return f"{self.init}_n{self.cases}_s{self.seed}"


def _budget_value(text: str) -> Any:
    """A budget as the bundle's ``label_budget`` takes it: 'all', an int count or a float fraction."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--budgets: {text!r} is not 'all', a number of cases or a fraction") from None


def plan_study(bundle: str, datalist: Path, dataset_dir: Path | None, pretrained: Path | None,
               budgets: Sequence[str], seeds: int, overrides: Mapping[str, Any]) -> list[Run]:
    """Check every argument, then list the runs (smallest budget first). Nothing is trained or written here."""
    from misfm_bundle_glue import check_datalist, load_datalist
    from misfm_bundle_glue.runtime import budget_count
    from misfm_nets import load_pretrained

    bundle_dir = bundle_folder(bundle)
    base = str(dataset_dir or datalist.parent)
    training = load_datalist(str(datalist), "training", base)
    validation = load_datalist(str(datalist), "validation", base, dedupe=False)
    if not validation:
        raise ValueError(f"datalist {str(datalist)!r} has an empty 'validation' list: the study evaluates every model "
                         "on it; add labelled validation cases.")
    check_datalist(training, "training")
    check_datalist(validation, "validation")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}.")
    config = bundle_config(bundle_dir, overrides)
    epochs, every = (int(config.get_parsed_content(k)) for k in ("max_epochs", "val_interval"))
    if every > epochs:
        raise ValueError(f"val_interval {every} > max_epochs {epochs}: no validation would run, so no model.pt would "
                         "be saved to evaluate; --set val_interval=... no larger than max_epochs.")
    counts = {}
    for text in budgets:
        counts[text] = budget_count(_budget_value(text), len(training))
    if pretrained is not None:
        if not pretrained.is_file():
            raise ValueError(f"--pretrained {str(pretrained)!r} does not exist.")
        try:
            load_pretrained(bundle_network(config), str(pretrained), mode="encoder")
        except (ValueError, TypeError) as err:
            raise ValueError(f"--pretrained {str(pretrained)!r} "
                             f"does not fit the {bundle_dir.name} network: {err}") from err
    inits = INITS if pretrained is not None else ("scratch",)
    order = sorted(counts.items(), key=lambda kv: kv[1])
    return [Run(init, text, count, seed) for text, count in order for seed in range(seeds) for init in inits]


def _result(run_dir: Path) -> dict | None:
    path = run_dir / "result.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _organ_dice(metrics_csv: Path) -> dict[str, float]:
    """Per-organ mean Dice over the validation cases (the ``mean`` row of the bundle's per-class CSV)."""
    with open(metrics_csv, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, mean = rows[0], rows[-1]
    prefix = "val_mean_dice_"
    return {h[len(prefix):]: float(v) for h, v in zip(header, mean) if h.startswith(prefix)}


def _execute(run: Run, bundle_dir: Path, run_dir: Path, datalist: Path, dataset_dir: Path | None,
             pretrained: Path | None, overrides: Mapping[str, Any], launcher: Sequence[str] | None,
             progress: str) -> dict:
    common = {"data_list_file_path": str(datalist.resolve()),
              "dataset_dir": str((dataset_dir or datalist.parent).resolve()),
              "ckpt_dir": str(run_dir / "models"), **overrides}
    multi = ["multi_gpu_train.json"] if launcher else []
    train = dict(common, output_dir=str(run_dir / "train"), label_budget=_budget_value(run.budget),
                 label_budget_seed=run.seed, seed=run.seed,
                 pretrained_checkpoint=str(pretrained.resolve()) if run.init == "pretrained" else "")
    kwargs = {"launcher": launcher} if launcher else {}
    run_bundle(bundle_dir, "training", ["train.json", *multi], train, run_dir / "train.log", f"{progress} training",
               **kwargs)
    evaluation = dict(common, output_dir=str(run_dir / "eval"))
    multi_eval = ["multi_gpu_evaluate.json"] if launcher else []
    run_bundle(bundle_dir, "run", ["train.json", "evaluate.json", *multi_eval], evaluation, run_dir / "evaluate.log",
               f"{progress} evaluation", **kwargs)
    organs = _organ_dice(run_dir / "eval" / "per_class_metrics.csv")
    record = json.loads((run_dir / "train" / "run.json").read_text(encoding="utf-8"))
    result = {"init": run.init, "budget": run.budget, "cases": len(record["training_cases"]), "seed": run.seed,
              "organ_dice": organs, "mean_dice": float(np.nanmean(list(organs.values()))) if organs else math.nan,
              "training_cases": record["training_cases"],
              "pretrained_checkpoint_sha256": record.get("pretrained_checkpoint_sha256", "")}
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    tmp.replace(run_dir / "result.json")  # written last: its presence marks the run as done
    return result


def run_study(bundle: str, datalist: Path, pretrained: Path | None, budgets: Sequence[str], seeds: int,
              output_dir: Path, dataset_dir: Path | None = None, overrides: Mapping[str, Any] | None = None,
              nproc: int = 1) -> dict[str, Path]:
    """Plan, run (or continue) every run, then write the CSV, the plot and the summary; returns their paths."""
    if importlib.util.find_spec("matplotlib") is None:  # the plot is drawn last: say so before hours of training
        raise ValueError("the study draws its plot with matplotlib, which is not installed: pip install 'misfm[demo]'")
    overrides = dict(overrides or {})
    runs = plan_study(bundle, datalist, dataset_dir, pretrained, budgets, seeds, overrides)
    bundle_dir = bundle_folder(bundle)
    launcher = None
    if nproc > 1:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        launcher = [torchrun, "--nproc_per_node", str(nproc), "-m"]
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, run in enumerate(runs, 1):
        run_dir = output_dir / "runs" / run.name
        done = _result(run_dir)
        progress = f"[{i}/{len(runs)}] {run.init}, {run.cases} labelled case(s), seed {run.seed}:"
        if done is not None:
            print(f"{progress} done earlier, kept", flush=True)
            results.append(done)
            continue
        results.append(_execute(run, bundle_dir, run_dir, datalist, dataset_dir, pretrained, overrides, launcher,
                                progress))
    return write_outputs(results, output_dir, bundle_dir.name)


def write_outputs(results: Sequence[Mapping[str, Any]], output_dir: Path, bundle: str) -> dict[str, Path]:
    """The study's CSV, plot and summary from the runs' results."""
    organs = sorted({o for r in results for o in r["organ_dice"]})
    table = output_dir / "label_efficiency.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["budget", "labelled_cases", "seed", "initialisation", *[f"dice_{o}" for o in organs],
                         "mean_dice"])
        for r in sorted(results, key=lambda r: (r["cases"], r["seed"], r["init"])):
            writer.writerow([r["budget"], r["cases"], r["seed"], r["init"],
                             *[f"{r['organ_dice'].get(o, math.nan):.4f}" for o in organs], f"{r['mean_dice']:.4f}"])
    plot = _plot(results, output_dir / "label_efficiency.png", bundle)
    summary = output_dir / "summary.txt"
    summary.write_text(_summary(results, bundle), encoding="utf-8")
    print(summary.read_text(encoding="utf-8"))
    return {"csv": table, "plot": plot, "summary": summary}


def _by_cases(results: Sequence[Mapping[str, Any]], init: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in results:
        if r["init"] == init:
            out.setdefault(int(r["cases"]), []).append(float(r["mean_dice"]))
    return dict(sorted(out.items()))


def _plot(results: Sequence[Mapping[str, Any]], path: Path, bundle: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for init, colour in (("pretrained", "tab:orange"), ("scratch", "tab:blue")):
        series = _by_cases(results, init)
        if not series:
            continue
        x = np.array(list(series))
        values = [np.array(v) for v in series.values()]
        mean = np.array([np.nanmean(v) for v in values])
        low, high = np.array([np.nanmin(v) for v in values]), np.array([np.nanmax(v) for v in values])
        label = "VF-pretrained init" if init == "pretrained" else "from scratch"
        ax.plot(x, mean, "o-", color=colour, label=f"{label} (mean over seeds)")
        ax.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
        for xi, v in zip(x, values):
            ax.scatter([xi] * len(v), v, color=colour, s=12, alpha=0.6)
    cases = sorted({int(r["cases"]) for r in results})
    if len(cases) > 2:
        ax.set_xscale("log", base=2)
    ax.set_xticks(cases, [str(c) for c in cases])
    seeds = len({r["seed"] for r in results})
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("mean Dice on the validation list")
    ax.set_title(f"{bundle}: label efficiency ({seeds} seed(s); band = min..max)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _summary(results: Sequence[Mapping[str, Any]], bundle: str) -> str:
    pre, scratch = _by_cases(results, "pretrained"), _by_cases(results, "scratch")
    seeds = len({r["seed"] for r in results})
    lines = [f"Label-efficiency study, {bundle}: mean Dice on the validation list (mean +- sd over {seeds} seed(s))",
             f"{'labelled cases':>15} {'pretrained':>17} {'scratch':>17} {'gain':>8}"]
    for cases in sorted(set(pre) | set(scratch)):
        p, s = pre.get(cases, []), scratch.get(cases, [])
        cell = lambda v: f"{np.nanmean(v):.3f} +- {np.nanstd(v):.3f}" if v else "-"  # noqa: E731
        gain = f"{np.nanmean(p) - np.nanmean(s):+.3f}" if p and s else "-"
        lines.append(f"{cases:>15} {cell(p):>17} {cell(s):>17} {gain:>8}")
    lines += [
        "Read with care: model.pt is the checkpoint with the best validation Dice, and the same validation list is",
        "evaluated here, so both columns are optimistic alike; with few validation cases and seeds the gain is",
        "within noise unless it exceeds the spread; Dice against model-made labels (e.g. TotalSegmentator) measures",
        "agreement with that model, not clinical accuracy.",
    ]
    return "\n".join(lines) + "\n"


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, lists, true/false), else strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: write key=value, e.g. --set max_epochs=200")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m misfm_demo.label_efficiency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="abdomen, thorax, headneck or a segmentation bundle folder")
    parser.add_argument("--datalist", required=True, type=Path, help="decathlon-style JSON with training and "
                        "validation lists")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="folder the datalist's paths are relative to "
                        "(default: the datalist's own folder)")
    parser.add_argument("--pretrained", type=Path, default=None, help="PCT-Net checkpoint to fine-tune from (the "
                        "pretraining bundle's models/model.pt, or misfm-convert's output); "
                        "without it only scratch runs")
    parser.add_argument("--budgets", nargs="+", default=["all"], help="numbers of labelled cases, fractions, 'all'")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per budget (different subsets and inits)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/label_efficiency"))
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="bundle config overrides for every run, e.g. max_epochs=200 device=cuda:0")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs per run (torchrun with the multi-GPU configs)")
    args = parser.parse_args(argv)
    try:
        outputs = run_study(args.bundle, args.datalist, args.pretrained, args.budgets, args.seeds, args.output_dir,
                            args.dataset_dir, parse_overrides(args.overrides), args.nproc)
    except ValueError as err:
        parser.error(str(err))
    for name, path in outputs.items():
        print(f"{name:>8}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
