"""`advserve analyze`: run the exact-gradient study and report it: a table in the terminal (with a
progress bar while it samples), `study.json` with every number, and two PNG plots (matplotlib, Agg):

* `weights.png`: each estimator's implied per-prompt weight against the prompt's pass rate (Monte Carlo
  with 95% intervals, the exact expectation, the closed forms of `analysis.theory`);
* `group_size.png`: cosine with ∇J and relative scale against the group size M.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import torch

from . import montecarlo, theory
from .montecarlo import FULL, QUICK, EstimatorResult, StudyConfig, StudyResult
from .toy import ToyProblem, default_problem

PLOTS = ("weights.png", "group_size.png")  # the files `run` writes beside study.json
MATPLOTLIB_HINT = ("the plots need matplotlib: pip install 'advserve[analysis]' (matplotlib==3.11.2), "
                   "or pass --no-plots")


class MissingDependency(RuntimeError):
    """matplotlib is not installed (the plots need it)."""


class ProgressBar:
    """Progress of the sampling. On a terminal: one line redrawn in place (at most every 0.1 s). On
    anything else (a CI log, a pipe): one plain line per finished stage (group size), nothing between."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30):
        self.stream = stream
        self.width = width
        self.tty = bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"
        self.start = self.stage_start = time.perf_counter()
        self.label: str | None = None
        self.last_draw = -1.0

    def __call__(self, done: int, total: int, label: str) -> None:
        now = time.perf_counter()
        if label != self.label:
            self._stage_done(now)
            self.label = label
        if self.tty and (now - self.last_draw >= 0.1 or done == total):
            filled = self.width * done // total
            self.stream.write(f"\rsampling [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                              f"{label} {now - self.start:5.1f} s" + ("\n" if done == total else ""))
            self.stream.flush()
            self.last_draw = now

    def close(self) -> None:
        self._stage_done(time.perf_counter())
        self.label = None

    def _stage_done(self, now: float) -> None:
        if self.label is not None and not self.tty:
            self.stream.write(f"sampled {self.label} ({now - self.stage_start:.1f} s)\n")
            self.stream.flush()
        self.stage_start = now


# --- the terminal report ---------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _interval(e: montecarlo.Estimate, digits: int = 3) -> str:
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def _verdict(r: EstimatorResult) -> str:
    parts = []
    if r.agrees_with_exact is not None:
        parts.append(f"exact {'yes' if r.agrees_with_exact else 'NO'} (|z|≤{r.max_abs_z_exact:.1f})")
    parts.append(f"closed form {'yes' if r.agrees_with_closed_form else 'no'} (|z|≤{r.max_abs_z_closed_form:.1f})")
    return ", ".join(parts)


def format_report(result: StudyResult) -> str:
    """The terminal tables: the problem, then per M the estimators' cosine, scale and references, then
    the per-prompt implied weights at the largest M."""
    prob = result.problem
    cfg = result.config
    lines = [
        f"problem: {prob['prompts']} prompts, V = {prob['vocab']}, H = {prob['horizon']}, "
        f"{prob['responses_per_prompt']} responses each, {prob['parameters']} parameters; "
        f"J = {prob['objective']:.4f}, ‖∇J‖ = {prob['gradient_norm']:.4f}",
        "prompt        " + "".join(f"{i + 1:>8d}" for i in range(prob["prompts"])),
        "p(x)          " + "".join(f"{v:>8.3f}" for v in prob["pass_rate"]),
        "T(x) mean     " + "".join(f"{v:>8.2f}" for v in prob["mean_length"]),
        "T(x) harmonic " + "".join(f"{v:>8.2f}" for v in prob["harmonic_length"]),
        "",
        f"{cfg['replicates']} batches per M (every prompt once, M responses each), seed {cfg['seed']}; "
        f"95% intervals (jackknife over {cfg['blocks']} blocks); 'agrees': within "
        f"{montecarlo.AGREEMENT_Z} standard errors on the scale and every prompt's weight.",
    ]
    header = (f"{'estimator':<22} {'seed':<10} {'cosine with ∇J':<24} {'scale':<24} {'exact E ĝ':>9} "
              f"{'closed form':>11} {'M → ∞':>7}  agrees with")
    for m in cfg["group_sizes"]:
        rows = [r for r in result.results if r.group_size == m]
        if not rows:
            continue
        lines += ["", f"M = {m}  (groups with no signal: {rows[0].no_signal_fraction:.1%})", header,
                  "-" * len(header)]
        for r in rows:
            lines.append(
                f"{r.estimator:<22} {r.bias:<10} {_interval(r.cosine, 4):<24} {_interval(r.scale):<24} "
                f"{_fmt(r.exact.scale if r.exact else None):>9} {_fmt(r.closed_form.scale):>11} "
                f"{_fmt(r.limit.scale):>7}  {_verdict(r)}")
    m = max(cfg["group_sizes"])
    rows = [r for r in result.results if r.group_size == m]
    lines += ["", f"implied weight per prompt at M = {m}: Monte Carlo ± 95% half-width / exact E ĝ / closed form"]
    head = f"{'estimator':<22}" + "".join(
        f"{f'p={p:.3f} T={t:.1f}':>25}" for p, t in zip(prob["pass_rate"], prob["mean_length"]))
    lines += [head, "-" * len(head)]
    for r in rows:
        cells = []
        for i, w in enumerate(r.weights):
            exact = r.exact.weights[i] if r.exact else None
            cells.append(f"{w.value:.2f}±{w.high - w.value:.2f} / {_fmt(exact, 2)} / {r.closed_form.weights[i]:.2f}")
        lines.append(f"{r.estimator:<22}" + "".join(f"{c:>25}" for c in cells))
    lines += ["", f"{len(result.results)} estimator × M cells in {result.seconds:.1f} s"]
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependency(MATPLOTLIB_HINT) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Line style per family of the seed's bias table, and a colour and marker per estimator (12 of each, all
# distinct: tab10 plus black and navy; markers that differ in shape, not only in size).
FAMILY_STYLE = {"unbiased": "-", "scaled": "--", "reweighted": ":"}
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p")


def _styles(names) -> dict[str, tuple]:
    """(colour, marker) of each estimator, distinct for up to 12 names."""
    import matplotlib

    palette = [matplotlib.colormaps["tab10"](i) for i in range(10)] + [(0.0, 0.0, 0.0, 1.0), (0.1, 0.1, 0.5, 1.0)]
    return {name: (palette[i % len(palette)], _MARKERS[i % len(_MARKERS)]) for i, name in enumerate(names)}


def overlapping(references: dict[str, list[float]], digits: int = 3) -> list[list[str]]:
    """Estimators whose reference curves coincide (equal at every M when rounded to `digits`), in groups
    of two or more, in the order of `references`: one line is drawn for each group, not one per member."""
    by_curve: dict[tuple, list[str]] = {}
    for name, values in references.items():
        by_curve.setdefault(tuple(round(v, digits) for v in values), []).append(name)
    return [names for names in by_curve.values() if len(names) > 1]


def plot_weights(result: StudyResult, toy: ToyProblem, path: Path, group_size: int | None = None) -> Path:
    """Implied weight against pass rate, one panel per estimator, at `group_size` (default: largest M)."""
    plt = _pyplot()
    m = group_size or max(result.config["group_sizes"])
    rows = [r for r in result.results if r.group_size == m]
    cols = 4
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.0 * cols, 3.1 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    grid = torch.linspace(0.01, 0.99, 197, dtype=torch.float64)
    p = torch.tensor(result.problem["pass_rate"])
    lengths = {"dapo": toy.mean_length, "grpo_original": toy.harmonic_length}
    top = 4.6
    for ax, r in zip(axes.flat, rows):
        ax.axhline(1.0, color="0.75", lw=0.8, ls=":")
        name = r.estimator
        if name in lengths:
            for length, style in ((float(lengths[name].min()), "-"), (float(lengths[name].max()), "--")):
                curve = theory.asymptotic_prompt_weight(name, grid, m, mean_length=torch.full_like(grid, length))
                label = "T̄" if name == "dapo" else "T_h"
                ax.plot(grid, curve, color="0.35", lw=1, ls=style, label=f"M → ∞, {label} = {length:.1f}")
        elif name in ("reinforce_pp", "reinforce_pp_baseline"):
            ax.plot(grid, torch.full_like(grid, r.asymptotic_weights[0]), color="0.35", lw=1,
                    label="NM → ∞: (M−1)/M·1/σ" if name.endswith("baseline") else "NM → ∞: 1/σ")
        else:
            ax.plot(grid, theory.asymptotic_prompt_weight(name, grid, m), color="0.35", lw=1,
                    label="closed form, M → ∞")
        if name in theory.EXACT_GROUP_ESTIMATORS:
            ax.plot(grid, theory.exact_group_weight(name, grid, m), color="tab:red", lw=1, ls="--",
                    label=f"exact_group_weight, M = {m}")
        if name == "grpo_original":
            ax.plot(p, r.limit.weights, "x", color="0.2", ms=6, label="exact limit M → ∞ (enumeration)")
        if r.exact is not None:
            ax.plot(p, r.exact.weights, "o", mfc="none", mec="black", ms=9, label=f"exact E ĝ, M = {m}")
        values = [w.value for w in r.weights]
        errors = [[w.value - w.low for w in r.weights], [w.high - w.value for w in r.weights]]
        ax.errorbar(p, values, yerr=errors, fmt="o", color="tab:blue", ms=4, capsize=2,
                    label="Monte Carlo, 95% interval")
        ax.set_title(f"{name} ({r.bias})", fontsize=10)
        ax.set_ylim(0, top)
        ax.set_xlim(0, 1)
        ax.legend(fontsize=6, loc="upper center", frameon=False)
    for ax in axes[-1]:
        ax.set_xlabel("pass rate p(x)")
    for ax in axes[:, 0]:
        ax.set_ylabel("implied weight")
    for ax in list(axes.flat)[len(rows):]:
        ax.set_visible(False)
    fig.suptitle(f"Implied weight of each prompt relative to ∇J (toy problem, M = {m}, "
                 f"{result.config['replicates']} batches)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_group_sizes(result: StudyResult, path: Path) -> Path:
    """Cosine with ∇J and relative scale against the group size M, every estimator: one colour and marker
    per estimator (Monte Carlo points with 95% intervals), the line style of its family (exact E ĝ or the
    closed form), and estimators whose lines coincide drawn as one labelled line."""
    plt = _pyplot()
    sizes = sorted(result.config["group_sizes"])
    names = list(dict.fromkeys(r.estimator for r in result.results))
    styles = _styles(names)
    rows_of = {name: sorted((r for r in result.results if r.estimator == name), key=lambda r: r.group_size)
               for name in names}
    fig, axes = plt.subplots(1, 2, figsize=(15.5, 7.4))
    spread = 0.12
    for ax, key in zip(axes, ("cosine", "scale")):
        references = {name: [getattr(r.exact if r.exact is not None else r.closed_form, key) for r in rows]
                      for name, rows in rows_of.items()}
        shared = {name: group for group in overlapping(references) for name in group}
        for i, name in enumerate(names):
            rows, (color, marker) = rows_of[name], styles[name]
            offset = 2 ** (spread * (i - (len(names) - 1) / 2) / len(names))  # dodge on the log axis
            est = [getattr(r, key) for r in rows]
            family = rows[0].bias
            ax.errorbar([r.group_size * offset for r in rows], [e.value for e in est],
                        yerr=[[e.value - e.low for e in est], [e.high - e.value for e in est]], fmt=marker,
                        color=color, ms=5, capsize=2, label=f"{name} ({family})")
            group = shared.get(name)
            if group is None:
                ax.plot([r.group_size for r in rows], references[name], FAMILY_STYLE[family], color=color, lw=1.2)
            elif group[0] == name:  # one line for the group, in black, named in the legend
                values = references[name]
                where = (f"at {values[0]:.3g}" if len({round(v, 3) for v in values}) == 1 else "on one line")
                ax.plot(sizes, values, "-", color="black", lw=2.2, alpha=0.45, zorder=0,
                        label=f"{len(group)} estimators {where}: " + ", ".join(group))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(m) for m in sizes])
        ax.set_xlabel("group size M")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    axes[1].axhline(1.0, color="0.6", lw=0.8, ls=":")
    axes[0].set_ylabel("cosine(E ĝ, ∇J)")
    axes[1].set_ylabel("relative scale ⟨E ĝ, ∇J⟩ / ‖∇J‖²")
    axes[0].set_title("direction (1: the direction of ∇J)", fontsize=10)
    axes[1].set_title("scale: the implicit learning rate relative to ∇J (1: unbiased)", fontsize=10)
    fig.suptitle(f"Gradient of each estimator against the exact ∇J: M ∈ {{{', '.join(map(str, sizes))}}}, "
                 f"{result.config['replicates']} batches per M\n"
                 "points: Monte Carlo with 95% intervals; lines: exact E ĝ or the closed form, "
                 "solid unbiased, dashed scaled, dotted reweighted", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(value):
    """The document with non-finite floats (an infinite z of a zero standard error) as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --- the command -----------------------------------------------------------------------------------


def study_config(mode: str, *, seed: int = 0, group_sizes: tuple[int, ...] | None = None,
                 replicates: int | None = None, blocks: int | None = None,
                 estimators: tuple[str, ...] | None = None) -> StudyConfig:
    """The preset of `mode` ("quick" or "full") with the given overrides, validated."""
    base = {"quick": QUICK, "full": FULL}[mode]
    changes = {"seed": seed}
    if group_sizes:
        changes["group_sizes"] = tuple(group_sizes)
    if replicates is not None:
        changes["replicates"] = replicates
    if blocks is not None:
        changes["blocks"] = blocks
    if estimators:
        changes["estimators"] = tuple(estimators)
    return replace(base, **changes).validate()


def run(config: StudyConfig, out: Path | None, *, plots: bool = True, stream: TextIO = sys.stdout,
        progress_stream: TextIO = sys.stderr, mode: str = "custom") -> StudyResult:
    """Run the study, print the report to `stream`, and write study.json and (plots) the PNGs to `out`."""
    if plots:
        _pyplot()  # fail before sampling, not after
    toy = default_problem()
    bar = ProgressBar(progress_stream)
    stream.write(f"advserve analyze: {mode} mode, seed {config.seed}, group sizes "
                 f"{', '.join(map(str, config.group_sizes))}\n")
    stream.flush()
    result = montecarlo.run_study(toy, config, bar)
    bar.close()
    stream.write(format_report(result) + "\n")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        document = {"mode": mode, "torch": torch.__version__, **result.to_json()}
        (out / "study.json").write_text(json.dumps(_finite(document), indent=1, allow_nan=False) + "\n")
        written = [out / "study.json"]
        if plots:
            written.append(plot_weights(result, toy, out / "weights.png"))
            written.append(plot_group_sizes(result, out / "group_size.png"))
        else:  # plots of an earlier run would sit beside this study.json and contradict it
            for name in PLOTS:
                (out / name).unlink(missing_ok=True)
        stream.write("wrote " + ", ".join(str(p) for p in written) + "\n")
    return result
