"""The ``memopt`` command line: parses, calls the API, prints. No logic of its own.

Every command takes a MODEL (a bundled name, a Hugging Face folder, a .gguf file or a memopt folder).
``--json`` prints one JSON object on stdout and nothing else there (progress goes to stderr). Bad input
ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from memopt.core.errors import MemoptError

__all__ = ["build_parser", "main"]

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus a message over several lines; we promise one line."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"memopt: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _whole(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number, ``least`` or more."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


_count, _positive_int = _whole(0), _whole(1)


_MODEL_HELP = (
    "a bundled name (minilm, smollm2), a Hugging Face folder (config.json + *.safetensors), "
    "a .gguf file, or a folder written by memopt"
)


def _add_step_options(p: argparse.ArgumentParser, ranks: bool) -> None:
    model_help = _MODEL_HELP + (
        "; for estimate, a folder with config.json alone (no weights needed)" if ranks else ""
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument(
        "--task",
        choices=("infer", "train", "generate"),
        default="infer",
        help="one forward pass (infer), one training step: forward, backward, "
        "optimizer step with its state (train), or greedy generation of "
        "--max-new-tokens after a --seq prompt, KV cache counted (generate). Default: infer",
    )
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--seq", type=_positive_int, default=128, help="sequence length (default 128)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="dtype of weights and activations (default: the checkpoint's own, e.g. bfloat16 for "
        "a bfloat16 checkpoint; a GGUF file runs inference in its quantized blocks, float32 "
        "activations, and trains dequantized to float32); given, a GGUF is dequantized to it",
    )
    p.add_argument(
        "--optimizer",
        choices=("adamw", "sgd", "adamw8bit"),
        default="adamw",
        help="optimizer for --task train (default adamw)",
    )
    p.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        help="micro-batches per optimizer step (--batch is per micro-batch)",
    )
    p.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing per block (recompute in backward)",
    )
    if ranks:
        p.add_argument(
            "--ranks",
            type=_positive_int,
            default=1,
            help="processes sharing the model states under FSDP2/ZeRO-3 (per-rank figures)",
        )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=32,
        help="--task generate: tokens generated after the --seq prompt (default 32)",
    )
    p.add_argument(
        "--kv-int8", action="store_true", help="--task generate: an int8 KV cache (~3.8x smaller)"
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="the streamed run (`memopt run --max-memory`) within SIZE over the import baseline "
        "(e.g. 135MB): its peak RSS predicted (estimate) or measured (profile)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memopt",
        description="Measure, then shrink, the memory that a neural network needs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  memopt estimate smollm2 --task train --batch 4 --seq 512 --optimizer adamw8bit\n"
        "  memopt profile minilm --batch 8 --seq 256 --plot profile.png\n"
        "  memopt quantize smollm2 --method int4 -o smollm2-int4\n"
        "  memopt run smollm2-int4 --prompt 'The capital of France is' --max-new-tokens 16\n"
        "  memopt eval smollm2-int4\n"
        "  memopt finetune smollm2 --data notes.txt --optimizer adamw8bit --checkpointing\n"
        "  memopt plan minilm --seq 256 --plot plan.png\n"
        "  memopt demo",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "estimate",
        help="predict the memory of a step without reading any weights",
        description="Predict peak memory of one inference or training step by running "
        "the model on the meta device: no weight is read, no memory used. A Hugging Face "
        "folder holding config.json alone is enough (will a 70B fit, before downloading it?).",
    )
    _add_step_options(p, ranks=True)
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser(
        "profile",
        help="measure the memory of one real step",
        description="Run one real step on the real weights in a fresh child process "
        "and measure live tensor bytes (by category and module) and peak RSS.",
    )
    _add_step_options(p, ranks=False)
    p.add_argument("--plot", metavar="FILE.png", help="write the breakdown and timeline as a PNG")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser(
        "eval",
        help="quality: perplexity (causal LM) or embedding cosine (encoder)",
        description="Causal LMs: perplexity on --text, or by default on the held-out texts "
        "of four domains (pydoc: the Python docs' prose, the `perplexity` key; license: "
        "CPython's LICENSE.txt; news: IDLE's release notes; code: the json package's source), "
        "none of them calibration text. Encoders: cosine of mean-pooled embeddings "
        "against --reference over 64 fixed sentences.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to score (causal LMs)")
    p.add_argument(
        "--heldout",
        metavar="NAMES",
        help="comma-separated held-out texts to score without --text "
        "(default: pydoc,license,news,code; 'pydoc' alone: the one default text)",
    )
    p.add_argument(
        "--reference", metavar="MODEL", help="reference model (encoders; required there)"
    )
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=2048,
        help="tokens of the text to score (default 2048)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "quantize",
        help="quantize and save, reading the source tensor by tensor",
        description="Quantize MODEL and save it as a memopt folder (safetensors + "
        "memopt.json). The source is read one tensor (or one block, for "
        "calibrated int4) at a time, so the float model is never held "
        "whole. The saved folder is a MODEL for every other command.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--method",
        choices=("float32", "float16", "bfloat16", "int8", "int8-dynamic", "int4", "int3", "int2"),
        help="float16/bfloat16/float32: cast (norms kept in float32); int8: weights "
        "per output channel (embeddings: groups of 128); int8-dynamic: int8 weights and "
        "activations; int4: "
        "calibrated (GPTQ) 4-bit weights, group 64; int3/int2: group 32",
    )
    how.add_argument(
        "--config",
        metavar="FILE",
        help="instead of --method: a quantization config as a JSON file, any of memopt.quant's "
        '(e.g. {"type": "Int4WeightOnly", "group_size": 32}; a "Mixed" config gives each '
        "module its own format)",
    )
    p.add_argument(
        "--group-size",
        type=_positive_int,
        metavar="G",
        help="input channels sharing one scale (must divide the layers' widths)",
    )
    p.add_argument(
        "--algo",
        choices=("gptq", "rtn"),
        help="int4: gptq (calibrated, default) or rtn (round to nearest); int3 / int2: rtn "
        "(default) or gptq",
    )
    p.add_argument(
        "--calib",
        metavar="FILE",
        help="calibration text for gptq (default: docs, code and release notes mixed; "
        "no held-out text)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser(
        "run",
        help="generate text (greedy by default)",
        description="Generate text with MODEL (float, a memopt folder, or a GGUF file in its "
        "own quantized blocks) and report "
        "decode speed (tokens/s, prefill excluded) and peak RSS.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default 32)"
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the model's chat template (instruct models)",
    )
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy")
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="stream the blocks from disk to keep the run within SIZE over the import "
        "baseline (e.g. 135MB, 1.5GiB); refused, naming the smallest that works, "
        "when SIZE cannot hold one block",
    )
    p.add_argument(
        "--kv-int8",
        action="store_true",
        help="an int8 KV cache: int8 codes and a float32 scale a position and head (~3.8x smaller)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a causal LM on a text file, every memory option a flag",
        description="Fine-tune MODEL on the text in --data with the memory options "
        "as flags (8-bit AdamW, checkpointing, 16-bit weights with "
        "float32 masters, gradient accumulation, FSDP2 ranks). Writes "
        "periodic checkpoints (safetensors + JSON; --resume continues), "
        "loss.jsonl and loss.png to --out.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text to fine-tune on")
    p.add_argument(
        "--out",
        default="finetune-out",
        metavar="DIR",
        help="folder for checkpoints, loss.jsonl and loss.png (default finetune-out)",
    )
    p.add_argument("--steps", type=_positive_int, default=50, help="optimizer steps (default 50)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq", type=_positive_int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit", "sgd"), default="adamw")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="weight dtype (default: the checkpoint's own); 16-bit keeps float32 master weights",
    )
    p.add_argument(
        "--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step"
    )
    p.add_argument(
        "--ranks",
        type=_positive_int,
        default=1,
        help="processes sharding the model with FSDP2 (launched by memopt)",
    )
    p.add_argument("--save-every", type=_positive_int, default=25, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "prune",
        help="prune and save, with storage that turns sparsity into bytes",
        description="Prune MODEL's Linear weights and save a memopt folder. "
        "Unstructured and N:M sparsity are stored as bitmask or CSR plus "
        "the kept values (chosen per tensor when it saves bytes); "
        "structured pruning removes FFN neurons and heads, leaving a "
        "smaller dense model. Tied embeddings are not pruned.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument(
        "--method",
        required=True,
        help="magnitude, wanda, sparsegpt (activation-aware, calibrated on text), "
        "N:M such as 2:4, or structured",
    )
    p.add_argument("--sparsity", type=float, help="fraction of weights removed, in [0, 1)")
    p.add_argument(
        "--values",
        choices=("float", "int8", "int4"),
        default="float",
        help="store the kept values as float, int8 or int4 (prune, then quantize; with int8 "
        "or int4, the tied embedding and head, which are not pruned, are stored int8)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser(
        "distill",
        help="distill a teacher into a smaller student built from it",
        description="Build a student from TEACHER (every other block, chosen blocks, or "
        "narrower FFNs; initialised from the teacher's weights), train it to imitate "
        "the teacher on pydoc_data.topics text, score both on held-out text, and save "
        "the student as a memopt folder. Checkpoints (safetensors + JSON) are written "
        "periodically to --checkpoints; --resume continues an interrupted run.",
    )
    p.add_argument("model", metavar="TEACHER", help=_MODEL_HELP)
    p.add_argument(
        "--student",
        default="half-depth",
        help="half-depth (every other block, default), keep=I,J,... (those blocks) "
        "or width=F (that fraction of the FFN neurons)",
    )
    p.add_argument("--steps", type=_positive_int, default=600, help="optimizer steps (default 600)")
    p.add_argument(
        "--batch", type=_positive_int, default=16, help="sequences per step (default 16)"
    )
    p.add_argument("--seq", type=_positive_int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4 encoder, 2e-4 LM)")
    p.add_argument(
        "--temperature", type=float, default=2.0, help="soft-target temperature T (causal LMs)"
    )
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=1.0,
        help="weight of matching each student block to its teacher block (0: off)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write")
    p.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="checkpoint folder (default: DIR.checkpoints beside the output)",
    )
    p.add_argument(
        "--save-every", type=_positive_int, help="checkpoint every N steps (default steps / 4)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint (without it a run starts afresh)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser(
        "plan",
        help="static activation plan: every intermediate in one arena",
        description="Capture the inference graph (torch.export), compute each "
        "intermediate tensor's size and lifetime, and place them all at "
        "precomputed offsets in one arena. Then run the planned step "
        "and check it: same outputs as eager, zero allocations.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--seq", type=_positive_int, default=128, help="sequence length (default 128)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the plan: tensors as lifetime × offset")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="plan only; skip running the arena executor against eager",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "export",
        help="write MODEL as a GGUF file (llama.cpp) or a plain Hugging Face folder",
        description="Write MODEL for another tool. --format gguf: one .gguf file that "
        "llama.cpp loads and runs (llama, mistral, qwen2): int8 as Q8_0, int4 as Q4_0 / Q4_1 "
        "from their own codes and scales (exact where the block holds them; requantized with "
        "the error reported where it cannot), float tensors as stored, architecture keys and "
        "tokenizer carried. --format safetensors: a folder (config.json, model.safetensors "
        "with float weights, quantized ones dequantized; tokenizer files) that transformers' "
        "from_pretrained loads.",
    )
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--format", required=True, choices=("gguf", "safetensors"), help="what to write")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help="the file to write (gguf, e.g. model.gguf) or the folder (safetensors)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "fit",
        help="the best model that fits a memory budget, applied and measured",
        description="Plan the model that fits SIZE (each transformer block, the embedding and "
        "the head get a weight format: float32, int8, int4 in groups of 32/64/128, int3 or "
        "int2 in groups of 32; the "
        "least quality loss measured per unit on calibration text, chosen by a knapsack "
        "over exact bytes), apply it from the file without the float model (GPTQ where "
        "int4), and measure the run you asked for in a fresh process: peak memory against "
        "the budget, perplexity on held-out text against float32, tokens/s. A run over the "
        "budget is planned again with the excess; a budget too small is refused, naming the "
        "smallest that fits. --task train searches the training options instead and trains "
        "--steps steps of them and of plain float32 AdamW (the comparison, which may exceed "
        "the budget) on the same data: peak, step time and loss of each.",
    )
    p.add_argument(
        "model", metavar="MODEL", help=_MODEL_HELP + "; config.json alone with --plan-only"
    )
    p.add_argument(
        "--budget",
        required=True,
        metavar="SIZE",
        help="peak memory the run may add over the runtime's own baseline (measured and "
        "printed): bytes or a number with a unit (150MB, 1.5GiB)",
    )
    p.add_argument(
        "--budget-total",
        action="store_true",
        help="SIZE is the whole process's peak; the measured baseline is subtracted",
    )
    p.add_argument(
        "--task",
        choices=("generate", "infer", "train"),
        default="generate",
        help="greedy generation with a KV cache of --seq + --max-new-tokens positions "
        "(generate, default), one forward of an encoder on --batch × --seq tokens, quality the "
        "embedding cosine against float32 (infer), or training steps of --batch × --seq (train)",
    )
    p.add_argument(
        "--batch", type=_positive_int, default=1, help="batch size (train: global batch; 1)"
    )
    p.add_argument("--seq", type=_positive_int, default=128, help="prompt / sequence length (128)")
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=128, help="tokens generated (default 128)"
    )
    p.add_argument(
        "--quality",
        metavar="METRIC<=X",
        help="refuse a plan whose measured quality misses: ppl_ratio<=1.05 (perplexity "
        "over float32's), or ppl<=20; --task infer: cosine>=0.99",
    )
    p.add_argument("--speed", metavar=">=X", help="refuse a plan decoding under X tokens/s")
    p.add_argument(
        "--calib-samples",
        type=_positive_int,
        default=4,
        metavar="N",
        help="windows of calibration text for the sensitivities and GPTQ (default 4)",
    )
    p.add_argument(
        "--calib-seq",
        type=_positive_int,
        default=128,
        metavar="T",
        help="tokens per calibration window (default 128)",
    )
    p.add_argument(
        "--refine",
        type=_count,
        default=None,
        metavar="N",
        help="--task generate: whole plans measured after the knapsack (the KL of each whole "
        "quantized model on calibration text), the best kept within the budget (default 32; 0: "
        "the knapsack's plan)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=50,
        help="--task train: steps measured of the chosen options and of plain (default 50)",
    )
    p.add_argument(
        "--ranks",
        type=_positive_int,
        default=1,
        help="--task train: allow FSDP2 over up to N processes when nothing fits one (per-rank "
        "peak; --batch split over the ranks)",
    )
    p.add_argument("-o", "--output", metavar="DIR", help="the memopt folder to write")
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="print the plan (per unit: format, bytes, predicted cost) without applying it",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser(
        "demo",
        help="the main job on the bundled default model (smollm2)",
        description="Will smollm2 fit in 160 MB? The float32 estimate against the budget, then "
        "memopt fit to a few budgets, each fitted run measured and set on a budget-vs-quality "
        "plot beside the uniform recipes; then estimate, profile, optimize and verify the "
        "bundled smollm2, print the before/after tables and write a report folder "
        "(report.json, PNG plots, report.html).",
    )
    p.add_argument("--model", default="smollm2", help="model to run the demo on (default smollm2)")
    p.add_argument("--out", default="memopt-report", help="report folder (default memopt-report)")
    p.add_argument("--json", action="store_true", help="print report.json's content on stdout")
    p.add_argument(
        "--quick",
        action="store_true",
        help="skip the slowest parts: the fits, calibrated pruning, streamed generation, training",
    )
    p.set_defaults(func=_cmd_demo)
    return parser


# --------------------------------------------------------------------------------------------------
# Output helpers


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output: rich would assume 80 columns and wrap the tables; give them room instead.
    width = None if stream.isatty() else 120
    return Console(stderr=stderr, highlight=False, width=width)


@contextlib.contextmanager
def _progress(description: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr; yields a ``callback(done, total)``."""
    with _stages(quiet) as stage:
        yield lambda done, total: stage(description, done, total)


@contextlib.contextmanager
def _stages(quiet: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr whose description follows the stage: ``callback(stage, i, n)``."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    if quiet or not sys.stderr.isatty():
        yield lambda stage, done, total: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)
        yield lambda stage, done, total: bar.update(
            task, description=stage, completed=done, total=total if total and total > 1 else None
        )


@contextlib.contextmanager
def _status(message: str) -> Iterator[None]:
    if not sys.stderr.isatty():
        yield
        return
    with _console(stderr=True).status(message):
        yield


def _print_json(obj: Any) -> None:
    from memopt.report import dumps

    sys.stdout.write(dumps(obj) + "\n")


def _memory_tables(report: dict, title: str) -> list[Any]:
    from memopt.report import format_bytes, rich_table

    peak = report["peak_bytes"]
    rows = [
        (cat, format_bytes(v), f"{100 * v / peak:.1f} %" if peak else "–")
        for cat, v in report["breakdown"].items()
    ]
    rows.append(("peak", format_bytes(peak), "100 %"))
    if report.get("peak_rss_bytes") is not None:
        base = report.get("baseline_rss_bytes") or 0
        rows.append(("peak RSS (process)", format_bytes(report["peak_rss_bytes"]), ""))
        rows.append(("  over import baseline", format_bytes(report["peak_rss_bytes"] - base), ""))
    tables = [rich_table(title, ("category", "bytes", "share"), rows)]
    modules = report.get("modules") or []
    if modules:
        top = sorted(
            modules,
            key=lambda m: -max(m.get("forward_delta_bytes", 0), m.get("backward_delta_bytes", 0)),
        )[:10]
        tables.append(
            rich_table(
                "modules that add the most (peak inside the module minus live bytes on entry)",
                ("module", "forward +", "backward +", "own params"),
                [
                    (
                        m["name"] or "(model)",
                        format_bytes(m.get("forward_delta_bytes", 0)),
                        format_bytes(m.get("backward_delta_bytes", 0)),
                        format_bytes(m.get("param_bytes", 0)),
                    )
                    for m in top
                ],
            )
        )
    return tables


# --------------------------------------------------------------------------------------------------
# Commands


def _fitted(args: argparse.Namespace) -> dict | None:
    """The run plan of a folder that ``memopt fit`` made, when no --max-memory overrides it."""
    if args.max_memory is not None:
        return None
    from memopt.formats.fit_plan import fitted_run

    return fitted_run(args.model)


def _keep_fitted_budget(args: argparse.Namespace, fitted: dict, positions: int | None) -> None:
    """A fitted folder's generation run keeps to its budget, and says so on stderr. ``positions``
    (``memopt run``: prompt + new tokens) up to what the fit measured: the run it measured (the
    whole model resident, through the decode engine); more, or None (estimate, profile): the
    budget becomes the run's --max-memory (blocks stream when a larger KV cache needs room)."""
    budget, measured = fitted["max_memory_bytes"], fitted["positions"]
    if positions is not None and positions <= measured:
        how = "this run is the one it measured"
    else:
        args.max_memory = str(budget)
        how = "the run keeps to that budget"
    _console(stderr=True).print(
        f"[dim]{args.model} was fitted to {budget / 1e6:.1f} MB over the import baseline "
        f"(measured at {measured} positions): {how} (--max-memory overrides)[/]"
    )


def _memory_report(args: argparse.Namespace, measured: bool) -> dict:
    if str(args.model).endswith(".keras"):  # a Keras 3 model (torch backend)
        from memopt.keras.files import memory_report as keras_memory_report

        spec = {"task": args.task, "batch": args.batch, "seq": args.seq}
        return keras_memory_report(args.model, spec, measured)
    from memopt.compose import memory_report

    fitted = _fitted(args) if args.task == "generate" else None
    if fitted is not None:
        _keep_fitted_budget(args, fitted, None)
        args.kv_int8 = args.kv_int8 or fitted.get("kv_int8", False)  # the fit's KV cache
    return memory_report(
        args.model, measured=measured, task=args.task, batch=args.batch, seq=args.seq,
        dtype=args.dtype, optimizer=args.optimizer, checkpointing=args.checkpointing,
        ranks=getattr(args, "ranks", 1), grad_accum=args.grad_accum,
        max_new_tokens=args.max_new_tokens, kv_int8=args.kv_int8, max_memory=args.max_memory,
    )  # fmt: skip


def _memory_title(kind: str, args: argparse.Namespace, report: dict) -> str:
    spec = report.get("spec", {})
    return (
        f"{kind}: {args.model}, {args.task}, batch {args.batch} × seq {args.seq}, "
        f"{spec.get('dtype', args.dtype)}"
        + (f" activations, {report['weights']}" if report.get("weights") else "")
        + (f", {args.optimizer}" if args.task == "train" else "")
        + (", checkpointing" if args.checkpointing else "")
        + (f", per rank of {args.ranks}" if getattr(args, "ranks", 1) > 1 else "")
        + (f", {args.max_new_tokens} new tokens" if args.task == "generate" else "")
        + (
            f", streamed within {args.max_memory} (peak = RSS over the import baseline)"
            if args.max_memory
            else ""
        )
    )


def _cmd_estimate(args: argparse.Namespace) -> int:
    with _status("estimating on the meta device (no weights read)"):
        report = _memory_report(args, measured=False)
    if args.json:
        _print_json(report)
        return 0
    console = _console()
    for table in _memory_tables(report, _memory_title("estimate", args, report)):
        console.print(table)
    return 0


def _float16_note(dtype: str | None) -> None:
    """One line on stderr where the user asked for float16 and this CPU computes it slowly
    (measured: memopt.measure.cpu16)."""
    if dtype == "float16":
        from memopt.measure.cpu16 import float16_note

        note = float16_note()
        if note:
            sys.stderr.write(f"memopt: note: {note}: use --dtype bfloat16\n")


def _cmd_profile(args: argparse.Namespace) -> int:
    _float16_note(args.dtype)
    with _status("loading and running one step in a child process"):
        report = _memory_report(args, measured=True)
    if args.plot:
        from memopt.report import plot_breakdown_timeline

        plot_breakdown_timeline(report, args.plot, title=f"{args.model}: {args.task} step")
    if args.json:
        _print_json(report)
        return 0
    console = _console()
    for table in _memory_tables(report, _memory_title("profile", args, report)):
        console.print(table)
    if args.plot:
        console.print(f"plot written to {args.plot}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from memopt.core.texts import read_text
    from memopt.evaluate import embedding_cosine, perplexity
    from memopt.models import load_model

    text = read_text(args.text) if args.text else None
    names = _heldout_names(args)
    with _progress("loading", quiet=args.json) as cb:
        loaded = load_model(args.model, progress=cb)
    if loaded.task == "causal-lm" and names is not None:
        from memopt.evaluate import heldout_perplexities

        with _progress("scoring held-out texts", quiet=args.json) as cb:
            per = heldout_perplexities(
                loaded, names or None, max_tokens=args.max_tokens, progress=cb
            )
        first = per.get("pydoc") or next(iter(per.values()))
        # the default text's figures under the old keys; every text under "heldout"
        result = first.to_dict()
        result["text"] = "pydoc" if "pydoc" in per else next(iter(per))
        result["heldout"] = {
            k: {"perplexity": r.perplexity, "tokens": r.tokens, "nll": r.nll}
            for k, r in per.items()
        }
    elif loaded.task == "causal-lm":
        with _progress("scoring", quiet=args.json) as cb:
            result = perplexity(loaded, text, max_tokens=args.max_tokens, progress=cb).to_dict()
    else:
        if not args.reference:
            raise MemoptError(
                f"{args.model} is an encoder: give --reference MODEL to compare against"
            )
        with _progress("loading reference", quiet=args.json) as cb:
            ref = load_model(args.reference, progress=cb)
        result = embedding_cosine(loaded, ref).to_dict()
    if args.json:
        _print_json(result)
        return 0
    from memopt.report import rich_table

    heldout = result.pop("heldout", None)
    _console().print(
        rich_table(
            f"quality: {args.model}",
            ("metric", "value"),
            [(k, f"{v:.6g}" if isinstance(v, float) else v) for k, v in result.items()],
        )
    )
    if heldout:
        _console().print(
            rich_table(
                f"perplexity on the held-out texts (first {args.max_tokens} tokens of each)",
                ("text", "perplexity", "tokens"),
                [(k, f"{r['perplexity']:.4g}", r["tokens"]) for k, r in heldout.items()],
            )
        )
    return 0


def _heldout_names(args: argparse.Namespace) -> list[str] | None:
    """The held-out texts ``eval`` scores: None with --text (that file alone), [] for all."""
    from memopt.core.texts import HELDOUT

    if args.text:
        if args.heldout:
            raise MemoptError("--heldout and --text: give one of them")
        return None
    if not args.heldout:
        return []  # every held-out text this Python has
    names = [n.strip() for n in args.heldout.split(",") if n.strip()]
    bad = [n for n in names if n not in HELDOUT]
    if bad or not names:
        raise MemoptError(
            f"--heldout: unknown text {bad[0] if bad else ''!r} (of {', '.join(HELDOUT)})"
        )
    return names


def _cmd_quantize(args: argparse.Namespace) -> int:
    from memopt.core.texts import read_text
    from memopt.quant.config import method_config, read_config
    from memopt.quant.stream import quantize_model

    if args.config is not None:
        if args.group_size is not None or args.algo is not None:
            raise MemoptError("--group-size and --algo go with --method; --config says it all")
        config = read_config(args.config)
    else:
        config = method_config(args.method, args.group_size, args.algo)
    label = args.method or config.fmt
    calib = read_text(args.calib) if args.calib else None
    if str(args.model).endswith(".keras"):  # a Keras 3 model: int8 / int4 on memopt's layers
        from memopt.keras.files import quantize_file

        if args.config is not None or args.algo is not None or args.calib:
            raise MemoptError("a .keras model takes --method int8|int4 [--group-size G] only")
        with _status(f"quantizing to {label}"):
            result = quantize_file(args.model, args.method, args.output, args.group_size or 64)
    else:
        with _progress(f"quantizing to {label}", quiet=args.json) as cb:
            result = quantize_model(args.model, config, args.output, calib=calib, progress=cb)
    if getattr(config, "dtype", None) == "float16":  # a cast to float16: will it run slowly here?
        from memopt.measure.cpu16 import float16_note

        slow = float16_note()
        if slow:
            result["note"] = "; ".join(
                filter(None, [result.get("note"), f"{slow}: --method bfloat16"])
            )
    if args.json:
        _print_json(result)
        return 0
    from memopt.report import format_bytes, rich_table

    before, after = result["bytes_before"], result["bytes_after"]
    rows = [
        ("weights before (float)", format_bytes(before), "1.00×"),
        ("weights after, in RAM", format_bytes(after), f"{after / before:.3f}×"),
        ("on disk", format_bytes(result["disk_bytes"]), f"{result['disk_bytes'] / before:.3f}×"),
        ("peak RSS while quantizing", format_bytes(result["peak_rss_bytes"]), ""),
    ]
    console = _console()
    console.print(
        rich_table(
            f"quantize: {args.model} → {args.output} ({label})",
            ("", "bytes", "vs before"),
            rows,
        )
    )
    if result.get("skipped"):
        console.print(
            f"{len(result['skipped'])} modules kept as they were: "
            + ", ".join(f"{k} ({v})" for k, v in list(result["skipped"].items())[:3])
        )
    if result.get("note"):
        console.print(f"note: {result['note']}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from memopt.core.rss import peak_rss_bytes
    from memopt.generate import run_model

    fitted = _fitted(args)
    if fitted is not None:
        from memopt.stream.run import prompt_token_count

        count = prompt_token_count(args.model, args.prompt, args.chat)
        _keep_fitted_budget(args, fitted, count + args.max_new_tokens)
        args.kv_int8 = args.kv_int8 or fitted.get("kv_int8", False)  # the fit's KV cache
    if args.max_memory is not None:
        return _run_streamed(args)
    with _status("generating"):
        result = run_model(
            args.model,
            args.prompt,
            args.max_new_tokens,
            greedy=not args.sample,
            chat=args.chat,
            kv_int8=args.kv_int8,
        )
    result["peak_rss_bytes"] = peak_rss_bytes()
    return _print_generation(
        args,
        result,
        f"prefill {result['prefill_s']:.2f} s, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB",
    )


def _print_generation(args: argparse.Namespace, result: dict, memory: str) -> int:
    """The generated text, then one dim line: tokens, decode speed and the memory figures."""
    if args.json:
        _print_json(result)
        return 0
    console = _console()
    console.print(result["text"], markup=False, highlight=False)
    tps = result.get("tokens_per_s")
    speed = f"{tps:.1f} tokens/s decode, " if tps else ""
    console.print(f"[dim]{len(result['tokens'])} tokens, {speed}{memory}[/]")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from memopt.train import finetune

    _float16_note(args.dtype)
    bar_ctx = _progress("fine-tuning", quiet=args.json)
    with bar_ctx as cb:
        result = finetune(
            args.model,
            args.data,
            out_dir=args.out,
            steps=args.steps,
            batch=args.batch,
            seq=args.seq,
            lr=args.lr,
            optimizer=args.optimizer,
            checkpointing=args.checkpointing,
            dtype=args.dtype,
            grad_accum=args.grad_accum,
            ranks=args.ranks,
            save_every=args.save_every,
            resume=args.resume,
            progress=lambda step, total, loss: cb(step, total),
        )
    if args.json:
        _print_json(result)
        return 0
    from memopt.report import rich_table

    losses = result["losses"]
    rows = [
        ("steps", f"{result['start_step']} → {result['steps']}"),
        ("loss, first → last", f"{losses[0]:.4f} → {result['final_loss']:.4f}" if losses else "–"),
        ("tokens/s", f"{result['tokens_per_s']:.0f}"),
        ("checkpoint", result["checkpoint"]),
        ("loss plot", result["loss_plot"]),
    ]
    _console().print(rich_table(f"finetune: {args.model} on {args.data}", ("", ""), rows))
    return 0


def _run_streamed(args: argparse.Namespace) -> int:
    from memopt.stream.run import run_measured

    with _status(f"generating within {args.max_memory} (streamed, in a child process)"):
        result = run_measured(
            args.model,
            args.prompt,
            args.max_new_tokens,
            args.max_memory,
            chat=args.chat,
            kv_int8=args.kv_int8,
        )
    return _print_generation(
        args,
        result,
        f"peak {result['peak_over_baseline_bytes'] / 2**20:.0f} MiB over the "
        f"import baseline, budget {result['max_memory_bytes'] / 2**20:.0f} MiB",
    )


def _cmd_prune(args: argparse.Namespace) -> int:
    from memopt.prune import prune_model

    if str(args.model).endswith(".keras"):  # a Keras 3 model: magnitude, stored sparse
        from memopt.keras.files import prune_file

        with _status(f"pruning ({args.method})"):
            result = prune_file(args.model, args.method, args.sparsity, args.output, args.values)
    else:
        with _status(f"pruning ({args.method})"):
            result = prune_model(
                args.model, args.method, args.sparsity, args.output, values=args.values
            )
    if args.json:
        _print_json(result)
        return 0
    from memopt.report import format_bytes, rich_table

    before = result["bytes_before"]
    rows = [
        ("weights before", format_bytes(before), "1.00×"),
        (
            "weights after, in RAM",
            format_bytes(result["bytes_after"]),
            f"{result['bytes_after'] / before:.3f}×",
        ),
        ("on disk", format_bytes(result["disk_bytes"]), f"{result['disk_bytes'] / before:.3f}×"),
        ("sparsity of the pruned weights", f"{result['sparsity']:.3f}", ""),
    ]
    _console().print(
        rich_table(
            f"prune: {args.model} → {args.output} ({args.method})", ("", "value", "vs before"), rows
        )
    )
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from memopt.distill import distill_model

    result = distill_model(
        args.model,
        student=args.student,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        lr=args.lr,
        temperature=args.temperature,
        hidden_weight=args.hidden_weight,
        checkpoint_dir=args.checkpoints,
        checkpoint_every=args.save_every,
        resume=args.resume,  # without --resume a run starts afresh
        out_dir=args.output,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.json:
        _print_json(result)
        return 0
    from memopt.report import format_bytes, rich_table

    tb, sb = result["teacher_bytes"], result["student_bytes"]
    rows = [
        ("blocks", str(result["teacher_layers"]), str(result["student_layers"]), ""),
        ("weights in RAM", format_bytes(tb), format_bytes(sb), f"{sb / tb:.3f}×"),
        ("on disk", "", format_bytes(result["disk_bytes"]), ""),
        (
            "quality",
            f"{result['quality_teacher']:.4f}",
            f"{result['quality_student']:.4f} (before: {result['quality_student_before']:.4f})",
            f"{result['retained']:.1%} retained",
        ),
    ]
    console = _console()
    console.print(
        rich_table(
            f"distill: {args.model} → {args.output} ({args.student}, {result['steps']} steps)",
            ("", "teacher", "student", ""),
            rows,
        )
    )
    ckpt = result["checkpoint_dir"]
    console.print(f"[dim]quality: {result['quality_metric']}; checkpoints in {ckpt}[/]")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from memopt.plan import load_planned, plan_model, verify_plan, write_plan_png

    with _progress("loading", quiet=args.json) as cb:
        loaded = load_planned(args.model, progress=cb)
    with _status("capturing the graph and planning the arena"):
        plan = plan_model(loaded, batch=args.batch, seq=args.seq)
    result = plan.to_dict()
    result["model"] = args.model
    if not args.no_verify:
        with _status("running the planned step against eager"):
            result.update(verify_plan(plan, loaded))
    if args.plot:
        write_plan_png(plan, args.plot)
    if args.json:
        _print_json(result)
        return 0
    from memopt.report import format_bytes, rich_table

    lb = result["lower_bound_bytes"]
    rows = [
        (
            "arena (planned)",
            format_bytes(result["arena_bytes"]),
            f"{result['arena_bytes'] / lb:.3f}×" if lb else "–",
        ),
        ("lower bound (max live bytes)", format_bytes(lb), "1.000×"),
        (
            "naive (every tensor its own buffer)",
            format_bytes(result["naive_bytes"]),
            f"{result['naive_bytes'] / lb:.1f}×" if lb else "–",
        ),
    ]
    title = (
        f"plan: {args.model}, batch {args.batch} × seq {args.seq}, {result['tensors']} "
        f"tensors, strategy {result['strategy']}"
    )
    console = _console()
    console.print(rich_table(title, ("activations", "bytes", "vs lower bound"), rows))
    if "steady_state_allocations" in result:
        console.print(
            f"planned step: {result['steady_state_allocations']} allocations "
            f"(eager: {result['eager_allocations']}), max |output − eager| "
            f"{result['max_abs_diff']:.2e}, latency {result['latency_vs_eager']:.2f}× eager"
        )
    if result.get("note"):
        console.print(f"note: {result['note']}")
    if args.plot:
        console.print(f"plot written to {args.plot}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from memopt.models.export import export

    with _progress(f"exporting to {args.format}", quiet=args.json) as cb:
        result = export(args.model, args.format, args.output, progress=cb)
    if args.json:
        _print_json(result)
        return 0
    from memopt.report import format_bytes, rich_table

    rows = [("written", result["path"]), ("bytes", format_bytes(result["bytes"]))]
    if args.format == "gguf":
        types = ", ".join(f"{n} {t}" for t, n in sorted(result["types"].items()))
        n_exact = len(result["exact"])
        rows += [
            ("architecture", result["architecture"]),
            ("tensors", f"{result['tensors']} ({types})"),
            ("exact (bit for bit)", f"{n_exact} of {result['tensors']}"),
            ("tokenizer", result["tokenizer"]),
        ]
    else:
        rows += [
            ("tensors", f"{result['tensors']} ({result['dtype']})"),
            ("dequantized", str(len(result["dequantized"]))),
            ("files", ", ".join(result["files"])),
        ]
    console = _console()
    console.print(rich_table(f"export: {args.model} → {args.format}", ("", ""), rows))
    requantized = result.get("requantized") or {}
    if requantized:
        worst = min(requantized.items(), key=lambda kv: kv[1]["sqnr_db"])
        console.print(
            f"{len(requantized)} tensors not exact (worst: {worst[0]}, SQNR "
            f"{worst[1]['sqnr_db']:.1f} dB, max |error| {worst[1]['max_abs_error']:.3g}: "
            f"{worst[1]['why']}); --json lists each"
        )
    return 0


def _bound(text: str | None, flag: str, metrics: tuple[str, ...], op: str) -> tuple[str, float]:
    """``"ppl_ratio<=1.05"`` -> ("ppl_ratio", 1.05); one line and exit 2 on anything else."""
    if text is None:
        return "", 0.0
    metric, sep, value = text.replace(" ", "").partition(op)
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or (metrics and metric not in metrics) or not math.isfinite(number):
        want = " or ".join(f"{m}{op}X" for m in metrics) if metrics else f"{op}X"
        raise MemoptError(f"{flag} {text!r}: expected {want}")
    return metric, number


def _cmd_fit(args: argparse.Namespace) -> int:
    from memopt.compose.fit import Budget, fit

    if args.task == "infer":
        metric, bound = _bound(args.quality, "--quality", ("cosine",), ">=")
    else:
        metric, bound = _bound(args.quality, "--quality", ("ppl_ratio", "ppl"), "<=")
    _, speed = _bound(args.speed, "--speed", (), ">=")
    budget = Budget.parse(args.budget, total=args.budget_total)
    if not args.plan_only and args.output is None and args.task != "train":
        raise MemoptError("fit: give an output folder (-o DIR), or --plan-only")
    with _stages(quiet=args.json) as cb:
        result = fit(
            args.model,
            budget,
            args.output,
            task=args.task,
            seq=args.seq,
            max_new_tokens=args.max_new_tokens,
            batch=args.batch,
            plan_only=args.plan_only,
            max_ppl_ratio=bound if metric == "ppl_ratio" else None,
            max_ppl=bound if metric == "ppl" else None,
            min_tokens_per_s=speed if args.speed else None,
            calib_sequences=args.calib_samples,
            calib_seq=args.calib_seq,
            progress=cb,
            train_steps=args.steps,
            ranks=args.ranks,
            min_cosine=bound if metric == "cosine" else None,
            refine_evals=args.refine,
        )
    if args.json:
        _print_json(result)
        return 0
    console = _console()
    for table in _fit_tables(result):
        console.print(table)
    return 0


def _fit_tables(result: dict) -> list[Any]:
    """The plan (consecutive units of one format on one row) and the budget against the run."""
    from memopt.report import format_bytes, rich_table

    tables = []
    plan = result["plan"]
    if result["task"] in ("generate", "infer"):
        groups: list[list[dict]] = []
        for u in plan["units"]:
            if groups and groups[-1][-1]["format"] == u["format"] and "layer" in u["unit"]:
                groups[-1].append(u)
            else:
                groups.append([u])
        rows = []
        for g in groups:
            name = g[0]["unit"] if len(g) == 1 else f"{g[0]['unit']} … {g[-1]['unit']}"
            rows.append((name, g[0]["format"], format_bytes(sum(u["bytes"] for u in g)),
                         f"{sum(u['cost'] for u in g):.2e}"))  # fmt: skip
        if result["task"] == "infer":
            parts = (
                ("other weights (norms, float)", "fixed_bytes"),
                (f"activations, {result['batch']} × {result['seq']} (estimator)", "scratch_bytes"),
                ("runtime (loader, allocator)", "runtime_bytes"),
            )
            unit, cost = "1 - cosine", "predicted cost"
        else:
            parts = (
                ("other weights (norms, float)", "fixed_bytes"),
                (f"KV cache, {result['seq'] + result['max_new_tokens']} positions", "kv_bytes"),
                ("engine scratch", "scratch_bytes"),
                ("runtime (tokenizer, allocator)", "runtime_bytes"),
            )
            unit, cost = "nats/token", "predicted KL"
        for label, key in parts:
            fmt, kl = "", ""
            if key == "kv_bytes" and result.get("kv_int8_cost") is not None:  # KV precision chosen
                fmt = "int8" if plan.get("kv_int8") else "float32"
                kl = f"{result['kv_int8_cost']:.4f}" if plan.get("kv_int8") else "0"
            rows.append((label, fmt, format_bytes(plan[key]), kl))
        title = f"fit plan: {result['model']} (quality cost: {result['quality_costs']}, {unit})"
        tables.append(rich_table(title, ("unit", "format", "bytes", cost), rows))
    else:
        o = plan["options"]
        rows = [(k, str(o[k])) for k in ("label", "checkpointing", "loss_chunk", "optimizer",
                                          "dtype", "master_weights", "grad_accum", "batch",
                                          "ranks", "step_factor")]  # fmt: skip
        tables.append(rich_table(f"fit plan: {result['model']}, training", ("option", ""), rows))
        t = result.get("training")
        if t:
            f, p = t["fitted"], t["plain"]
            rows = [("peak over baseline", format_bytes(f["peak_bytes"]),
                     format_bytes(p["peak_bytes"]), f"{f['peak_bytes'] / p['peak_bytes']:.3f}×"),
                    ("step time (median)", f"{f['step_s']:.3f} s", f"{p['step_s']:.3f} s",
                     f"{t['step_time_ratio']:.3f}×"),
                    (f"loss ({t['loss_is']})", f"{f['loss']:.4f}", f"{p['loss']:.4f}",
                     f"{t['loss_delta']:+.4f}")]  # fmt: skip
            title = f"{t['steps']} training steps: fitted vs plain float32 AdamW ({t['data']})"
            tables.append(rich_table(title, ("", "fitted", "plain", "fitted vs plain"), rows))
    limit = result["limit_bytes"]
    rows = [("runtime baseline (measured, not counted)", format_bytes(result["baseline_rss_bytes"]), ""),
            ("budget over the baseline", format_bytes(limit), "1.000×"),
            ("predicted peak", format_bytes(result["predicted_peak_bytes"]),
             f"{result['predicted_peak_bytes'] / limit:.3f}×")]  # fmt: skip
    if result.get("measured_peak_bytes") is not None:
        m = result["measured_peak_bytes"]
        verdict = "within budget" if result["within_budget"] else "OVER BUDGET"
        rows.append((f"measured peak ({verdict})", format_bytes(m), f"{m / limit:.3f}×"))
    q = result.get("quality")
    if q and result["task"] == "infer":
        rows.append(("embedding cosine, held out (worst)", f"{q['fitted']:.5f} ({q['min']:.5f})",
                     ""))  # fmt: skip
    elif q:
        rows.append(("perplexity, held out (float32's)", f"{q['fitted']:.3f} ({q['float32']:.3f})",
                     f"{q['ratio']:.4f}×"))  # fmt: skip
    ref = result.get("refinement")
    if ref:
        rows.append((f"plan refined ({ref['evaluations']} whole plans measured, "
                     f"{ref['windows'][0]} windows)",
                     f"KL {ref['kl']:.4f} (knapsack's {ref['knapsack_kl']:.4f})",
                     ref["chosen_from"]))  # fmt: skip
    if result.get("tokens_per_s"):
        rows.append(("decode speed", f"{result['tokens_per_s']:.1f} tokens/s", ""))
    if result.get("step_s"):
        rows.append(("step time (plain's)", f"{result['step_s']:.3f} s", ""))
    title = f"fit: {result['model']} in {format_bytes(result['budget_bytes'])}"
    if result.get("output"):
        title += f" → {result['output']}"
    tables.append(rich_table(title, ("", "", "vs budget"), rows))
    return tables


def _cmd_demo(args: argparse.Namespace) -> int:
    from memopt.app.demo import run_demo

    console = None if args.json else _console()
    summary = run_demo(args.model, args.out, console=console, quick=args.quick)
    if args.json:
        _print_json(summary)
    return 0


# --------------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Peer libraries imported by transformers (torchao, when installed) log on import; the
    command line keeps stderr for progress and its own one-line errors."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except MemoptError as exc:
        sys.stderr.write(f"memopt: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("memopt: interrupted\n")
        return 130
    except OSError as exc:
        if exc.errno not in _ANTICIPATED or os.environ.get("MEMOPT_DEBUG"):
            return _internal(exc)
        path = exc.filename or getattr(args, "output", None)  # a write names no file: the output
        where = f"{path}: " if path else ""
        sys.stderr.write(f"memopt: error: {where}{exc.strerror or os.strerror(exc.errno)}\n")
        return EXIT_BAD_INPUT
    except MemoryError:
        sys.stderr.write("memopt: error: out of memory\n")
        return EXIT_BAD_INPUT
    except Exception as exc:
        from memopt.core.rss import ChildProcessFailed

        if isinstance(exc, ChildProcessFailed) and not exc.exc_type:
            # the child died without a word (killed: out of memory, a signal): not a bug in
            # memopt's code, an end of the run it could not prevent
            sys.stderr.write(f"memopt: error: {exc}\n")
            return EXIT_BAD_INPUT
        return _internal(exc)


# errno values of the file system's anticipated refusals: disk full, quota, permissions, a
# read-only file system, a path that is not there or not a folder, a file too large
_ANTICIPATED = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EFBIG,
    errno.ENAMETOOLONG,
    errno.EMFILE,
}


def _internal(exc: BaseException) -> int:
    """A bug in memopt, not the user's input: say so in one line, and how to report it."""
    if os.environ.get("MEMOPT_DEBUG"):
        raise exc
    first = (str(exc).strip().splitlines() or [""])[0]
    sys.stderr.write(
        f"memopt: internal error: {type(exc).__name__}: {first} "
        "(a bug in memopt: please report it, with the traceback MEMOPT_DEBUG=1 shows)\n"
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
