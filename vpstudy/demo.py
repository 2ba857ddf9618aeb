"""``vpstudy demo``: the main job on the shipped organism, end to end on CPU.

record (the shipped organism on its evaluation set) → analyze → fit a budget rule → evaluate
every pruning method on the same samples (the fitted rule included) → figures → ``report.md``.
Everything goes under one output directory::

    OUT/run/                 the dense recorded run (resumes if rerun), with run/analysis/
    OUT/budget_rule.json     the fitted rule
    OUT/compare/             one run per pruning method (+ eval.json), comparison.csv / .md
    OUT/figures/             PNG + PDF
    OUT/report.md            findings with their intervals, the rule, the comparison, the figures
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .stats.tables import AnalysisSettings

DEMO_DELTA = "1/Nv"  # the organism has 64 visual tokens: every absolute δ of the paper's grid is below 1/N_v


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs. ``samples`` examples of the shipped evaluation set are recorded with
    greedy decoding of up to ``max_new_tokens`` tokens, ``batch_size`` at a time."""

    family: str = "llava"
    samples: int = 128
    max_new_tokens: int = 48
    batch_size: int = 32
    delta: str = DEMO_DELTA
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)


@dataclass
class DemoResult:
    run: Path
    rule: Path
    report: Path
    figures: list[Path]
    skipped: list[str]
    summary: str


def _anchor_variants(result: dict) -> list:
    """VisionPulse ≤5% and its static control anchored at the layer that localizes best in the
    analysis (when that is not the default anchor): does the anchor's depth matter?"""
    from .evaluation import PlannedRun

    best = (result["headline"].get("localization_best") or [{}])[0].get("layer")
    if best is None or best == result["analysis_layer"]:
        return []
    paper = {"tau": "0.1", "b_min": "0.01", "b_max": "0.05", "anchor": str(best)}
    return [PlannedRun(f"visionpulse-5-anchor{best}", "visionpulse", paper),
            PlannedRun(f"static_topk-5-anchor{best}", "static_topk", {"ratio": "0.05", "anchor": str(best)})]


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), *, progress: bool = True,
             command: str = "vpstudy demo") -> DemoResult:  # fmt: skip
    """Run the whole pipeline into ``out`` (see the module docstring)."""
    from .analysis import analyze
    from .stats.fit import fit_budget
    from .collect import RecordSettings, record_dataset, summary_line
    from .datasets import load_dataset
    from .evaluation import compare
    from .figures import write_figures
    from .loading import ModelLoadError, load
    from .organism.shipped import eval_set_path, organism_dir
    from .report import render_report

    out = Path(out)
    model_dir = organism_dir(settings.family)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: no shipped organism of family {settings.family!r} (see data/README.md)")

    def say(message: str) -> None:
        if progress:
            print(message, flush=True)

    say(f"[1/5] record {settings.samples} examples with {model_dir}")
    model, processor = load(model_dir)
    dataset = load_dataset(eval_set_path(), limit=settings.samples)
    record = RecordSettings(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    run = record_dataset(model, processor, dataset, out / "run", record, model_path=str(model_dir), progress=progress)
    summary = summary_line(run)

    say("[2/5] analyze")
    result = analyze(run, settings=settings.analysis, progress=progress)
    layer = result["analysis_layer"]

    say(f"[3/5] fit a budget rule at layer {layer}, δ={settings.delta}")
    rule = fit_budget(run, layer=layer, delta=settings.delta, seed=settings.analysis.seed)
    rule_path = rule.save(out / "budget_rule.json")

    say("[4/5] evaluate every pruning method on the same samples (dense = the recording above)")
    table = compare(model, processor, dataset, out / "compare", settings=record, rule=rule, dense=run,
                    extra=_anchor_variants(result), model_path=str(model_dir), progress=progress)  # fmt: skip

    say("[5/5] figures and report")
    figures = write_figures([run.path], out / "figures", layer=layer, rule=rule_path, progress=progress,
                            comparisons=[out / "compare" / "comparison.csv"])  # fmt: skip
    report_path = out / "report.md"
    commands = [
        command,
        "# or step by step:",
        f"vpstudy record --model {model_dir} --data {eval_set_path()} --limit {settings.samples} "
        f"--max-new-tokens {settings.max_new_tokens} --batch-size {settings.batch_size} --out {out / 'run'}",
        f"vpstudy analyze {out / 'run'} --n-boot {settings.analysis.n_boot} --n-perm {settings.analysis.n_perm}",
        f"vpstudy fit-budget {out / 'run'} --layer {layer} --delta {shlex.quote(settings.delta)} --out {rule_path} --overwrite",
        f"vpstudy evaluate --model {model_dir} --data {eval_set_path()} --limit {settings.samples} --method all "
        f"--rule {rule_path} --max-new-tokens {settings.max_new_tokens} --batch-size {settings.batch_size} "
        f"--out {out / 'compare'}   # records its own dense row",
        f"vpstudy figures {out / 'run'} --out {out / 'figures'} --rule {rule_path} --comparison {out / 'compare' / 'comparison.csv'}",
    ]
    text = render_report(title=f"vpstudy demo: the shipped {settings.family} organism", result=result, rule=rule,
                         figures=figures.written, skipped=[*result["skipped"], *figures.skipped], out=report_path,
                         commands=commands, summary=summary, comparison=table)  # fmt: skip
    report_path.write_text(text, encoding="utf-8")
    return DemoResult(run.path, rule_path, report_path, list(figures.written), [*result["skipped"], *figures.skipped], summary)
