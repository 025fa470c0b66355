"""``memopt demo``: the main job on the bundled default model, end to end.

will it fit in N MB? (the float32 estimate against the budget, then ``memopt fit`` to a few budgets,
each fitted run measured: peak, bytes, perplexity) → estimate (no weights read) → profile (the real
step, measured in a child process) → the float32 baseline (a GGUF dequantized), the model as shipped
(a GGUF's own quantized blocks) and each optimization that memopt has → verify (bytes in RAM and on
disk, peak of an inference step, latency, perplexity) → tables on the terminal and a report folder
(report.json, PNGs, report.html; fit.png: budget against quality, the fitted models beside the
uniform recipes). Every figure in it is measured in this run; nothing is carried over from
elsewhere.
"""

from __future__ import annotations

import copy
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core.atomic import atomic_write_text, save_figure
from memopt.core.errors import MemoptError
from memopt.core.modules import model_bytes

__all__ = ["DemoRow", "run_demo"]

# Demo workload: small enough for the demo to finish quickly on a small CPU.
_STEP_SEQ = 128
_PPL_TOKENS = 512
# Pruning row: SparseGPT meets the 50 % quality target (Wanda does not on smollm2; bench/prune.py)
_PRUNE_METHOD = "sparsegpt"
_PRUNE_CALIB = 4
# "Will it fit?": the question's budget and the budgets fitted (bytes over the runtime's baseline,
# 1 MB = 10⁶ B), chosen for smollm2: float32 needs ~585 MB, the smallest plan ~141 MB. The run
# fitted: a prompt of _FIT_SEQ tokens and _FIT_NEW generated; a small calibration (its quality
# costs are cached on disk per model and calibration, so only the first demo measures them).
_FIT_QUESTION = 160_000_000
_FIT_BUDGETS = (160_000_000, 200_000_000, 300_000_000)
_FIT_SEQ, _FIT_NEW = 64, 32
_FIT_CALIB_SEQUENCES, _FIT_CALIB_SEQ = 2, 64
# The uniform recipes set beside the fitted models on fit.png (prefixes of DemoRow.technique)
_UNIFORM = ("float32", "GGUF", "bfloat16", "int8", "int4")


@dataclass
class DemoRow:
    """One technique's measured figures."""

    technique: str
    ram_bytes: int  # unique storage bytes of parameters and buffers
    disk_bytes: int  # safetensors file(s) written for it
    step_peak_bytes: int  # live tensor peak of one inference step (batch 1 × seq 128)
    latency_s: float  # median forward time, batch 1 × seq 128
    perplexity: float | None
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _disk_bytes(loaded: Any) -> int:
    """Save with memopt.models.saved (safetensors + manifest + tokenizer) in a temporary folder; sum its files."""
    from memopt.models.saved import disk_bytes, save

    with tempfile.TemporaryDirectory() as tmp:
        save(loaded, Path(tmp) / "model")
        return disk_bytes(Path(tmp) / "model")


def _latency(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step_peak(model: nn.Module, ids: torch.Tensor) -> int:
    from memopt.measure.tracker import MemoryTracker

    with torch.no_grad(), MemoryTracker(model, per_module=False, timeline=False) as tracker:
        tracker.track_existing(ids)
        model(input_ids=ids, use_cache=False)
    return tracker.peak_bytes


def _measure_row(
    technique: str, loaded: Any, ids: torch.Tensor, note: str = "", disk: int | None = None
) -> DemoRow:
    """``disk``: the bytes on disk when they are a file already there (the GGUF as shipped);
    otherwise the model is saved as a memopt folder and that is measured."""
    from memopt.evaluate import perplexity

    model = loaded.model
    ppl = perplexity(loaded, max_tokens=_PPL_TOKENS, window=_PPL_TOKENS, stride=_PPL_TOKENS)
    return DemoRow(
        technique=technique,
        ram_bytes=model_bytes(model),
        disk_bytes=_disk_bytes(loaded) if disk is None else disk,
        step_peak_bytes=_step_peak(model, ids),
        latency_s=_latency(model, ids),
        perplexity=ppl.perplexity,
        note=note,
    )


def _shipped_row(model_name: str, loaded: Any, ids: torch.Tensor) -> DemoRow | None:
    """The model as shipped, for a GGUF file with quantized weights: loaded in its own blocks
    (memopt.weights.GGMLWeight), its disk the file itself. None for any other source."""
    from memopt.models import load_model
    from memopt.weights import GGMLWeight

    source = loaded.source
    if source is None or source.kind != "gguf":
        return None
    shipped = load_model(model_name)  # no dtype: the blocks as they are in the file
    types = sorted({m.ggml_type for m in shipped.model.modules() if isinstance(m, GGMLWeight)})
    if not types:
        return None
    label = f"GGUF as shipped ({' + '.join(types)})"
    note = "the file's blocks, zero-copy; dequantized rows exactly llama.cpp's"
    return _measure_row(label, shipped, ids, note, disk=source.path.stat().st_size)


def _techniques() -> list[tuple[str, Callable[[nn.Module], Any], str]]:
    """(name, in-place transform, note) for each optimization available, in order."""
    from memopt.quant import Cast, Int4WeightOnly, Int8WeightOnly, quantize_

    return [
        ("bfloat16", lambda m: quantize_(m, Cast(dtype="bfloat16")), "norms kept in float32"),
        ("float16", lambda m: quantize_(m, Cast(dtype="float16")), "norms kept in float32"),
        ("int8", lambda m: quantize_(m, Int8WeightOnly()), "per channel, embedding too"),
        (
            "int4 g64 (RTN)",
            lambda m: quantize_(m, Int4WeightOnly(group_size=64)),
            "round to nearest, group 64",
        ),
    ]


def _mb(n: float) -> str:
    """Decimal megabytes, the unit of a fit's budget: 150000000 -> '150.0 MB'."""
    return f"{n / 1e6:.1f} MB"


def _formats_summary(units: list[dict]) -> str:
    """A plan's formats, most units first: 'int4-g32 ×29, float32 ×1, int4-g128 ×1'."""
    counts = Counter(u["format"] for u in units)
    return ", ".join(f"{f} ×{n}" for f, n in counts.most_common())


def _fit_section(model_name: str, say: Callable[..., Any]) -> dict[str, Any]:
    """Will ``model_name`` fit in _FIT_QUESTION bytes? The float32 estimate against it (from the
    fit's own plan: every unit's float32 bytes, the KV cache, scratch and runtime), then
    ``memopt fit`` to each of _FIT_BUDGETS in a temporary folder, each fitted model measured
    like the demo's rows (bytes in RAM, perplexity on the same _PPL_TOKENS tokens). A budget
    that fit refuses is reported with its reason."""
    from memopt.compose.fit import fit
    from memopt.evaluate import perplexity
    from memopt.models import load_model

    t0 = time.perf_counter()
    kwargs = dict(
        seq=_FIT_SEQ,
        max_new_tokens=_FIT_NEW,
        calib_sequences=_FIT_CALIB_SEQUENCES,
        calib_seq=_FIT_CALIB_SEQ,
        # the knapsack's plans: measuring whole plans (memopt.compose.fit_refine) quantizes every
        # unit in every format first, ~15 minutes a fit on smollm2 here, three times over
        refine_evals=0,
    )
    stage = [""]

    def progress(text: str, i: int, n: int) -> None:  # one line per stage, not per step
        if text != stage[0]:
            stage[0] = text
            say(f"    {text}")

    # The plan's overhead and its units' parameters do not depend on the budget: plan within one
    # that anything fits (never refused), estimate float32 from them.
    planned = fit(model_name, 1 << 40, plan_only=True, progress=progress, **kwargs)
    plan = planned["plan"]
    overhead = {k: plan[k] for k in ("fixed_bytes", "kv_bytes", "scratch_bytes", "runtime_bytes")}
    float32_weights = sum(4 * u["params"] for u in plan["units"])
    float32_estimate = float32_weights + sum(overhead.values())
    fits = float32_estimate <= _FIT_QUESTION
    question = {
        "budget_bytes": _FIT_QUESTION,
        "baseline_rss_bytes": planned["baseline_rss_bytes"],
        "float32_estimate_bytes": float32_estimate,
        "float32_weight_bytes": float32_weights,
        **overhead,
        "fits_as_float32": fits,
    }
    say(
        f"  float32 needs an estimated {_mb(float32_estimate)} over the runtime's baseline "
        f"({_mb(float32_weights)} of weights, KV cache of {_FIT_SEQ + _FIT_NEW} positions, "
        f"runtime): {'fits' if fits else 'does not fit'} as float32"
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="memopt-demo-fit-") as tmp:
        for budget in _FIT_BUDGETS:
            say(f"  fit in {_mb(budget)}")
            folder = Path(tmp) / f"fit-{budget // 1_000_000}MB"
            try:
                result = fit(model_name, budget, folder, progress=progress, **kwargs)
            except MemoptError as e:  # too small a budget: the reason, in one line
                runs.append({"budget_bytes": budget, "refused": str(e)})
                say(f"    refused: {e}")
                continue
            result.pop("output", None)  # the folder is temporary, not part of the report
            fitted = load_model(folder)
            ppl = perplexity(fitted, max_tokens=_PPL_TOKENS, window=_PPL_TOKENS, stride=_PPL_TOKENS)
            result.update(ram_bytes=model_bytes(fitted.model), perplexity=ppl.perplexity)
            del fitted
            runs.append(result)
            say(
                f"    {_formats_summary(result['plan']['units'])}: measured peak "
                f"{_mb(result['measured_peak_bytes'])}"
                f"{'' if result['within_budget'] else ' (OVER BUDGET)'}, "
                f"perplexity {ppl.perplexity:.2f}"
            )
    return {
        "question": question,
        "seq": _FIT_SEQ,
        "max_new_tokens": _FIT_NEW,
        "calib_sequences": _FIT_CALIB_SEQUENCES,
        "calib_seq": _FIT_CALIB_SEQ,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _fit_table(runs: list[dict[str, Any]], base_perplexity: float | None) -> list[tuple[str, ...]]:
    """One row per budget: what was asked, predicted and measured (perplexity on the demo's
    _PPL_TOKENS tokens, against the demo's float32 row). A refused budget: "refused" in the row,
    its reason in the progress lines and below the HTML table."""
    rows = []
    for r in runs:
        budget = _mb(r["budget_bytes"])
        if "refused" in r:
            rows.append((budget, "–", "–", "refused", *["–"] * 5))
            continue
        ppl = r.get("perplexity")
        tps = r.get("tokens_per_s")
        rows.append(
            (
                budget,
                _mb(r["predicted_peak_bytes"]),
                _mb(r["measured_peak_bytes"]),
                "yes" if r["within_budget"] else "NO",
                _mb(r["ram_bytes"]),
                _formats_summary(r["plan"]["units"]),
                f"{ppl:.2f}" if ppl else "–",
                f"{ppl / base_perplexity:.3f}×" if ppl and base_perplexity else "–",
                f"{tps:.1f}" if tps else "–",
            )
        )
    return rows


_FIT_COLUMNS = (
    "budget",
    "predicted peak",
    "measured peak",
    "within budget",
    "weights in RAM",
    "formats",
    f"ppl ({_PPL_TOKENS} tok)",
    "vs fp32",
    "tok/s",
)


def run_demo(
    model_name: str = "smollm2",
    out: str | Path = "memopt-report",
    console: Any | None = None,
    quick: bool = False,
) -> dict:
    """Run the demo, write the report folder, return the summary (report.json's content).

    ``quick`` skips the slowest parts: the "will it fit?" section (``memopt fit`` to several
    budgets, each applied and measured), pruning with calibration, streamed generation in child
    processes, the training comparison; their functions are tested on their own.
    """
    from memopt.measure.estimate import estimate
    from memopt.measure.profile import profile
    from memopt.models import load_model
    from memopt.report import (
        dumps,
        format_bytes,
        html_page,
        html_table,
        plot_breakdown_timeline,
        rich_table,
    )
    from memopt.step.step import StepSpec

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemoptError(f"--out {out}: exists and is not a folder")
    say = console.print if console is not None else (lambda *a, **k: None)
    t_start = time.perf_counter()

    # 1. Will it fit in N MB? The float32 estimate against the budget, then the model fitted to a
    # few budgets, each run measured (before the float32 model below is loaded in this process).
    fitted: dict[str, Any] | None = None
    if quick:
        say("[bold]1. will it fit?[/] skipped (--quick)")
    else:
        say(
            f"[bold]1. will it fit?[/] {model_name} in {_mb(_FIT_QUESTION)} over the runtime's "
            f"baseline; then fitted to {', '.join(_mb(b) for b in _FIT_BUDGETS)}"
        )
        fitted = _fit_section(model_name, say)

    # 2. Estimate without reading a weight. The float32 model (a GGUF dequantized), the baseline
    # of every row below.
    infer = StepSpec(task="infer", batch=1, seq=512, dequantize=True)
    train = StepSpec(task="train", batch=1, seq=_STEP_SEQ, optimizer="adamw")
    say(f"[bold]2. estimate[/] {model_name} (meta device, no weights read)")
    est_infer, est_train = estimate(model_name, infer), estimate(model_name, train)

    # 3. Where does it go? Measure the same inference step for real, in a child process.
    say("[bold]3. profile[/] one inference step on the real weights (child process)")
    measured = profile(model_name, infer)
    measured_d = measured.to_dict()

    # 4. Optimize and verify: every row is measured on the model after the transform.
    say("[bold]4. optimize and verify[/] (bytes, step peak, latency, perplexity)")
    loaded = load_model(model_name, dtype=torch.float32)  # the baseline: float32, explicitly
    if loaded.task != "causal-lm":
        raise MemoptError(f"{model_name}: the demo needs a causal language model")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.vocab_size or 1000, (1, _STEP_SEQ), generator=gen)
    source_note = (
        "dequantized from the bundled Q4_1 GGUF"
        if loaded.source and loaded.source.kind == "gguf"
        else ""
    )
    rows = [_measure_row("float32 (baseline)", loaded, ids, source_note)]
    say(f"  {rows[-1].technique}: measured")
    shipped = _shipped_row(model_name, loaded, ids)
    if shipped is not None:
        rows.append(shipped)
        say(f"  {rows[-1].technique}: measured")
    for name, transform, note in _techniques():
        variant = copy.copy(loaded)
        variant.model = copy.deepcopy(loaded.model)
        transform(variant.model)
        rows.append(_measure_row(name, variant, ids, note))
        say(f"  {name}: measured")
        del variant

    # Structure: activation-aware pruning into sparse storage, measured like the rows above.
    pruned: dict[str, Any] | None = None
    if not quick:
        from memopt.app.rows import prune_row

        variant = copy.copy(loaded)
        variant.model = copy.deepcopy(loaded.model)
        pruned = prune_row(variant, method=_PRUNE_METHOD, sparsity=0.5, n_calib=_PRUNE_CALIB)
        note = f"bitmask + values, {_PRUNE_CALIB} × 256 calibration tokens"
        rows.append(_measure_row(pruned["technique"], variant, ids, note))
        say(f"  {pruned['technique']}: measured")
        del variant

    # 5. Allocation: plan every activation of the float32 step into one arena, run it, check it.
    say("[bold]5. plan[/] activations of one inference step into one arena")
    from memopt.plan import plan_model, verify_plan, write_plan_png

    plan = plan_model(loaded, batch=1, seq=_STEP_SEQ)
    plan_d = {**plan.to_dict(), **verify_plan(plan, loaded, repeat=3)}
    plan_rows = [
        (
            f"inference 1×{_STEP_SEQ}",
            format_bytes(plan_d["naive_bytes"]),
            format_bytes(plan_d["eager_activation_peak_bytes"]),
            format_bytes(plan_d["arena_bytes"]),
            format_bytes(plan_d["lower_bound_bytes"]),
            f"{plan_d['arena_bytes'] / plan_d['lower_bound_bytes']:.3f}×",
            f"{plan_d['steady_state_allocations']} (eager {plan_d['eager_allocations']})",
            f"{plan_d['latency_vs_eager']:.2f}×",
        )
    ]
    plan_cols = (
        "step",
        "naive",
        "eager peak",
        "arena",
        "lower bound",
        "arena / bound",
        "allocations / step",
        "latency vs eager",
    )

    # 6. Access: generation streamed under a budget of 25 % of the float32 weights (child processes).
    streamed: dict[str, Any] | None = None
    trained: dict[str, Any] | None = None
    stream_rows: list[tuple[str, ...]] = []
    train_rows: list[tuple[str, ...]] = []
    stream_cols = (
        "budget",
        "peak RSS over baseline",
        "within budget",
        "tok/s vs in-memory",
        "same tokens",
    )
    train_cols = ("training step", "peak", "vs plain", "step time vs plain", "loss vs plain")
    if not quick:
        say("[bold]6. stream[/] generation under a memory budget of 25 % of the float32 weights")
        from memopt.app.rows import stream_row

        with tempfile.TemporaryDirectory(prefix="memopt-demo-") as tmp:
            streamed = stream_row(model_name, tmp, share=0.25, max_new_tokens=8, loaded=loaded)
        stream_rows = [
            (
                format_bytes(streamed["budget_bytes"]),
                format_bytes(streamed["peak_over_baseline_bytes"]),
                "yes" if streamed["within_budget"] else "NO",
                f"{streamed['tokens_per_s_ratio']:.2f}×" if streamed["tokens_per_s_ratio"] else "–",
                "yes" if streamed["same_tokens"] else "NO",
            )
        ]

        # 7. Training memory: plain float32 AdamW against checkpointing + 8-bit AdamW + bfloat16.
        say("[bold]7. train[/] plain float32 AdamW vs checkpointing + AdamW8bit + bfloat16")
        from memopt.app.rows import train_row

        trained = train_row(loaded, batch=1, seq=_STEP_SEQ, steps=3)
        train_rows = [
            (
                f"plain fp32 AdamW 1×{_STEP_SEQ}",
                format_bytes(trained["plain"]["peak_bytes"]),
                "1.00×",
                "1.00×",
                "–",
            ),
            (
                "checkpointing + AdamW8bit + bf16",
                format_bytes(trained["optimized"]["peak_bytes"]),
                f"{trained['peak_ratio']:.2f}×",
                f"{trained['time_ratio']:.2f}×",
                f"{trained['loss_rel_diff']:+.1%}",
            ),
        ]

    # 8. Report.
    base = rows[0]
    fit_rows = _fit_table(fitted["runs"], base.perplexity) if fitted is not None else []
    table_rows = [
        (
            r.technique,
            format_bytes(r.ram_bytes),
            f"{r.ram_bytes / base.ram_bytes:.2f}×",
            format_bytes(r.disk_bytes),
            format_bytes(r.step_peak_bytes),
            f"{r.latency_s * 1e3:.0f} ms",
            f"{r.latency_s / base.latency_s:.2f}×",
            f"{r.perplexity:.2f}" if r.perplexity else "–",
            f"{r.perplexity / base.perplexity:.3f}×" if r.perplexity else "–",
        )
        for r in rows
    ]
    columns = (
        "technique",
        "RAM",
        "vs fp32",
        "disk",
        f"step peak (1×{_STEP_SEQ})",
        "latency",
        "vs fp32",
        f"ppl ({_PPL_TOKENS} tok)",
        "vs fp32",
    )
    est_rows = [
        (
            "inference 1×512",
            format_bytes(est_infer.peak_bytes),
            format_bytes(measured.peak_bytes),
            f"{est_infer.peak_bytes / measured.peak_bytes:.3f}",
            format_bytes(measured.peak_rss_bytes),
        ),
        ("training step 1×128 (adamw)", format_bytes(est_train.peak_bytes), "", "", ""),
    ]
    est_cols = ("step", "estimated peak", "measured peak", "estimate / measured", "peak RSS")
    if console is not None:
        if fitted is not None:
            title = f"{model_name}, fit: budget → measured (over the runtime's baseline)"
            console.print(rich_table(title, _FIT_COLUMNS, fit_rows))
        console.print(rich_table(f"{model_name}: estimate (float32)", est_cols, est_rows))
        console.print(
            rich_table(
                f"{model_name}: before / after (all measured in this run)", columns, table_rows
            )
        )
        console.print(
            rich_table(f"{model_name}: static activation plan (float32)", plan_cols, plan_rows)
        )
        if stream_rows:
            title = f"{model_name}: streamed generation (float32 weights)"
            console.print(rich_table(title, stream_cols, stream_rows))
        if train_rows:
            console.print(rich_table(f"{model_name}: training memory", train_cols, train_rows))

    out.mkdir(parents=True, exist_ok=True)
    plot_breakdown_timeline(
        measured_d,
        out / "profile.png",
        title=f"{model_name}: inference step, batch 1 × seq 512 (measured)",
    )
    _plot_rows(rows, out / "techniques.png")
    write_plan_png(plan, out / "plan.png")
    images = [out / "profile.png", out / "techniques.png", out / "plan.png"]
    if fitted is not None:
        _plot_fit(fitted["runs"], rows, out / "fit.png", title=f"{model_name}: budget vs quality")
        images.insert(0, out / "fit.png")
    summary = {
        "model": model_name,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
        },
        "fit": fitted,
        "estimate": {"infer": est_infer.to_dict(), "train": est_train.to_dict()},
        "profile": {k: v for k, v in measured_d.items() if k != "timeline"},
        "rows": [r.to_dict() for r in rows],
        "plan": plan_d,
        "prune": pruned,
        "stream": streamed,
        "train": trained,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_text(out / "report.json", dumps(summary))
    page = html_page(
        f"memopt report: {model_name}",
        (
            [(f"Will it fit in {_mb(_FIT_QUESTION)}?", _fit_html(fitted, fit_rows))]
            if fitted is not None
            else []
        )
        + [
            ("Estimate (float32)", html_table(est_cols, est_rows)),
            (
                "Before / after",
                html_table(columns, table_rows) + f"<p>{html_escape(source_note)}</p>",
            ),
            ("Static activation plan", html_table(plan_cols, plan_rows)),
        ]
        + (
            [("Streamed generation, 25 % budget", html_table(stream_cols, stream_rows))]
            if stream_rows
            else []
        )
        + ([("Training memory", html_table(train_cols, train_rows))] if train_rows else []),
        images=images,
    )
    atomic_write_text(out / "report.html", page)
    say(f"report written to {out}/ (report.html, report.json, PNGs) in {summary['seconds']} s")
    return summary


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def _plot_rows(rows: list[DemoRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 1024 * 1024
    names = [r.technique for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    a.barh(names, [r.ram_bytes / mib for r in rows], color="#4C72B0")
    a.set_xlabel("weights in RAM (MiB)")
    a.invert_yaxis()
    b.barh(names, [r.perplexity or 0 for r in rows], color="#55A868")
    b.set_xlabel(f"perplexity ({_PPL_TOKENS} tokens, lower is better)")
    b.invert_yaxis()
    save_figure(fig, path, dpi=110)


def _fit_html(fitted: dict[str, Any], fit_rows: list[tuple[str, ...]]) -> str:
    """The question answered in one paragraph, then the fit table."""
    from memopt.report import html_table

    q = fitted["question"]
    verdict = "fits" if q["fits_as_float32"] else "does not fit"
    # numbers and fixed words only: nothing to escape
    text = (
        f"Budget: {_mb(q['budget_bytes'])} over the runtime's own baseline "
        f"({_mb(q['baseline_rss_bytes'])}: Python with torch imported). As float32 the model needs "
        f"an estimated {_mb(q['float32_estimate_bytes'])} ({_mb(q['float32_weight_bytes'])} of "
        f"weights, a KV cache of {fitted['seq'] + fitted['max_new_tokens']} positions, the "
        f"runtime): it {verdict} as float32. <code>memopt fit</code> to each budget below, each "
        f"run measured in a fresh process (a {fitted['seq']}-token prompt, "
        f"{fitted['max_new_tokens']} tokens generated); perplexity on the same {_PPL_TOKENS} "
        "held-out tokens as the rows below."
    )
    refused = "".join(
        f"<p>{_mb(r['budget_bytes'])}: refused: {html_escape(r['refused'])}</p>"
        for r in fitted["runs"]
        if "refused" in r
    )
    return f"<p>{text}</p>" + html_table(_FIT_COLUMNS, fit_rows) + refused


def _plot_fit(runs: list[dict[str, Any]], rows: list[DemoRow], path: Path, title: str = "") -> None:
    """Budget vs quality: weights in RAM (MB) against perplexity, the fitted models as one series
    labelled by budget, the demo's uniform recipes (_UNIFORM) as separate labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    done = sorted((r for r in runs if "refused" not in r), key=lambda r: r["ram_bytes"])
    xs = [r["ram_bytes"] / 1e6 for r in done]
    ys = [r["perplexity"] for r in done]
    ax.plot(xs, ys, "o-", color="#C44E52", label="memopt fit (mixed formats)", zorder=3)
    for r, x, y in zip(done, xs, ys, strict=True):
        ax.annotate(
            f"fit {r['budget_bytes'] / 1e6:.0f} MB",
            (x, y),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color="#C44E52",
        )
    uniform = [r for r in rows if r.technique.startswith(_UNIFORM) and r.perplexity]
    ax.scatter(
        [r.ram_bytes / 1e6 for r in uniform],
        [r.perplexity for r in uniform],
        marker="s",
        color="#4C72B0",
        label="uniform recipes",
        zorder=2,
    )
    for r in uniform:
        ax.annotate(
            r.technique.split(" (")[0],  # "GGUF as shipped (Q4_1 + Q8_0)": "GGUF as shipped"
            (r.ram_bytes / 1e6, r.perplexity),
            xytext=(0, -13),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color="#4C72B0",
        )
    ax.set_xlabel("weights in RAM (MB, log)")
    ax.set_ylabel(f"perplexity, {_PPL_TOKENS} held-out tokens (log)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the log axes: 50, 100, 200, 500
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.08, y=0.12)  # room for the labels
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    save_figure(fig, path, dpi=110)
