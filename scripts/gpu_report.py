"""The report of ``make check-gpu``: issue 12's targets evaluated on the measured figures, and the
report written as Markdown and JSON (``check-gpu.md``, ``check-gpu.json``).

The report is a dict: ``machine`` (GPU, driver, CUDA, torch), ``steps`` (one entry per step of
scripts/check_gpu.py: ``name``, ``status`` ok | failed | skipped, ``seconds``, ``detail``),
``figures`` (``tests``, ``lars``, ``training``, ``horovod``, ``dali``, as the steps measured them;
a missing one was not measured) and ``targets`` (from :func:`evaluate_targets`).
"""
from __future__ import annotations

import json
from pathlib import Path

# issue 12's targets for a bare FusedLARS.step on the ResNet-50 parameter set and the training step
MIN_COPY_BANDWIDTH_FRACTION = 0.85
MAX_LAUNCHES = 4
MIN_SPEEDUP_OVER_PER_TENSOR_LOOP = 20.0
MIN_TRAINING_RATIO = 0.95


def _target(name: str, value, met: bool | None, shown: str) -> dict:
    return {"target": name, "value": value, "shown": shown,
            "met": met, "status": "not measured" if met is None else "met" if met else "MISSED"}


def evaluate_targets(figures: dict) -> list[dict]:
    """Each of issue 12's targets with its measured value and whether it is met (None: the figure
    is missing, e.g. a step failed)."""
    out = []
    tests = figures.get("tests")
    if tests is None:
        out.append(_target("every CUDA test passes", None, None, "-"))
    else:
        bad = tests["failed"] + tests["errors"]
        out.append(_target("every CUDA test passes", tests, bad == 0 and tests["passed"] > 0,
                           f"{tests['passed']} passed, {bad} failed, {tests['skipped']} skipped"))
    lars = figures.get("lars")
    if lars is None:
        for name in (f"FusedLARS.step >= {MIN_COPY_BANDWIDTH_FRACTION:.0%} of copy bandwidth",
                     f"FusedLARS.step in <= {MAX_LAUNCHES} launches",
                     f"FusedLARS >= {MIN_SPEEDUP_OVER_PER_TENSOR_LOOP:.0f}x the per-tensor loop"):
            out.append(_target(name, None, None, "-"))
    else:
        fused = lars["ms"]["FusedLARS"]
        fraction = lars["floor_ms"]["fused"] / fused
        out.append(_target(f"FusedLARS.step >= {MIN_COPY_BANDWIDTH_FRACTION:.0%} of copy bandwidth",
                           fraction, fraction >= MIN_COPY_BANDWIDTH_FRACTION, f"{fraction:.1%}"))
        launches = lars["launches"]["FusedLARS"]
        out.append(_target(f"FusedLARS.step in <= {MAX_LAUNCHES} launches", launches,
                           launches <= MAX_LAUNCHES, f"{launches:g}"))
        speedup = lars["ms"]["per-tensor loop"] / fused
        out.append(_target(f"FusedLARS >= {MIN_SPEEDUP_OVER_PER_TENSOR_LOOP:.0f}x the per-tensor loop",
                           speedup, speedup >= MIN_SPEEDUP_OVER_PER_TENSOR_LOOP, f"{speedup:.1f}x"))
    training = figures.get("training")
    name = f"training step >= {MIN_TRAINING_RATIO}x the plain loop's images/s"
    if training is None:
        out.append(_target(name, None, None, "-"))
    else:
        ratio = training["ratio"]
        out.append(_target(name, ratio, ratio >= MIN_TRAINING_RATIO, f"{ratio:.3f}x"))
    return out


def render_markdown(report: dict) -> str:
    """The report as Markdown: machine, steps, targets, then each figure section."""
    lines = ["# make check-gpu", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()]
    lines += ["", "## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for s in report["steps"]:
        detail = str(s.get("detail", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.1f} | {detail} |")
    lines += ["", "## Targets (issue 12)", "", "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['shown']} | {t['status']} |" for t in report["targets"]]
    for name, text in report.get("tables", {}).items():
        lines += ["", f"## {name}", "", "```", *text, "```"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folders: list[Path]) -> list[Path]:
    """Write check-gpu.md and check-gpu.json into every folder (created if needed)."""
    written = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        md, js = folder / "check-gpu.md", folder / "check-gpu.json"
        md.write_text(render_markdown(report))
        js.write_text(json.dumps(report, indent=2, default=str) + "\n")
        written += [md, js]
    return written
