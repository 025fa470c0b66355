"""Knowledge distillation: a smaller student learns from a teacher.

    student = drop_layers(teacher)                       # every other block, teacher's weights
    result = Distiller(teacher, student, DistillConfig(steps=300), checkpoint_dir="ck").train(data)

Loss (Hinton et al. 2015): ``alpha * T² * KL(softmax(t/T) ‖ softmax(s/T)) + (1 - alpha) * CE(s, y)``
(the T² keeps the soft term's gradients the same size whatever T), plus ``hidden_weight`` times the
mean squared error between student hidden states and the teacher's layers they were copied from.
A model without logits (a sentence encoder) is distilled on its hidden states alone.

``data`` is indexed by step (a sequence, used cyclically, or a function ``step -> batch``), so a run
resumed from a checkpoint sees exactly the batches it would have seen. Checkpoints are written every
``checkpoint_every`` steps in the training checkpoint format of :mod:`memopt.step.trainer` (a
:class:`~memopt.step.trainer.TrainState`: student weights and buffers, optimizer and RNG state in
safetensors; the step count in JSON, with the history and config as its ``extra``; never pickle),
and ``train()`` continues from the latest.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memopt.core import texts
from memopt.core.atomic import releases_outputs
from memopt.core.errors import MemoptError
from memopt.core.modules import model_bytes, require_blocks
from memopt.core.texts import default_calib_text, heldout_topics
from memopt.step.trainer import TrainState, has_state

__all__ = [
    "DistillConfig",
    "DistillResult",
    "Distiller",
    "distill_model",
    "drop_layers",
    "hidden_loss",
    "kd_loss",
    "narrow",
    "STUDENTS",
    "make_student",
    "parse_student",
    "paragraph_pairs",
    "retrieval_accuracy",
    "retrieval_scores",
]

Batch = Any


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft-target term; 1 - alpha on the hard labels
    hidden_weight: float = 0.0  # weight of hidden-state matching (0: off)
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 100
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    dropout: bool = False  # train the student with its dropout on (off: it matches sooner)
    schedule: str = "constant"  # or "cosine": lr decays to 0 at `steps` (after `warmup`)
    warmup: int = 0  # steps of linear warm-up from 0 to lr

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): a function of the step alone,
        so a resumed run follows the same schedule without a scheduler's state."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise MemoptError(f"distill: temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise MemoptError(f"distill: alpha must be in [0, 1], got {self.alpha!r}")
        if self.steps < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise MemoptError("distill: steps, checkpoint_every and log_every must be >= 1")
        if self.hidden_weight < 0 or self.lr <= 0:
            raise MemoptError("distill: hidden_weight must be >= 0 and lr > 0")
        if self.schedule not in ("constant", "cosine") or self.warmup < 0:
            raise MemoptError(
                f"distill: schedule must be 'constant' or 'cosine' (warmup >= 0), "
                f"got {self.schedule!r}"
            )


@dataclass
class DistillResult:
    steps: int
    resumed_from: int  # 0: a fresh run
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", ...}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Losses


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Soft-target KL at temperature T (scaled by T²) plus the hard-label cross-entropy.

    Logits ``(..., C)`` are flattened to ``(B, C)``; labels ``(...)`` (ignore index -100)."""
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c).float()  # (B, C)
    t = teacher_logits.reshape(-1, c).float().detach()
    T = temperature
    soft = F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean"
    ) * (T * T)
    if labels is None or alpha >= 1.0:
        return soft if labels is None else alpha * soft
    hard = F.cross_entropy(s, labels.reshape(-1), ignore_index=-100)
    return alpha * soft + (1 - alpha) * hard


def hidden_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layer_map: Sequence[int] | None = None,
) -> torch.Tensor:
    """Mean over student layers i of ``MSE(student_hidden[i], teacher_hidden[layer_map[i]])``.

    transformers' ``hidden_states`` hold the embeddings first, then each block's output, so block
    ``j`` of the student (copied from teacher block ``keep[j]``) is entry ``j + 1`` of its list and
    ``keep[j] + 1`` of the teacher's; ``layer_map`` is given in those list positions."""
    if layer_map is None:
        layer_map = list(range(len(student_hidden)))
    if len(layer_map) != len(student_hidden):
        raise MemoptError("hidden_loss: layer_map needs one teacher index per student layer")
    losses = [
        F.mse_loss(s.float(), teacher_hidden[j].float().detach())
        for s, j in zip(student_hidden, layer_map, strict=True)
    ]
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------------------
# Students built from the teacher


def drop_layers(teacher: nn.Module, keep: Sequence[int] | str = "every_other") -> nn.Module:
    """A student with a subset of the teacher's blocks, initialised from their weights.

    ``"every_other"`` keeps blocks L-1, L-3, ... (half, rounded up; the last block stays, since its
    output is what the head / pooling was trained on). The config's ``num_hidden_layers`` and each
    kept block's ``layer_idx`` (its key-value cache slot) are renumbered. ``student.memopt_keep``
    records the kept teacher blocks, for :func:`hidden_loss`."""
    student = copy.deepcopy(teacher)
    name, blocks = require_blocks(student, "drop_layers")
    n = len(blocks)
    if keep == "every_other":
        keep = sorted(range(n - 1, -1, -2))
    if isinstance(keep, str):
        raise MemoptError(
            f"drop_layers: keep must be 'every_other' or a list of indices, got {keep!r}"
        )
    keep = [int(i) for i in keep]
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < n for i in keep):
        raise MemoptError(
            f"drop_layers: keep must be distinct block indices in [0, {n}), got {keep}"
        )
    kept = nn.ModuleList([blocks[i] for i in keep])
    for new_i, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_i
    parent, _, child = name.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, child, kept)
    cfg = getattr(student, "config", None)
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        cfg.num_hidden_layers = len(keep)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            cfg.layer_types = [types[i] for i in keep]
    student.memopt_keep = keep
    return _trainable(student)


def narrow(teacher: nn.Module, width: float = 0.5, calib: Any = None) -> nn.Module:
    """A student with ``width`` of the teacher's FFN neurons / channels (structured pruning of a
    copy; heads kept)."""
    from memopt.prune import Structured, prune_

    if not 0 < width <= 1:
        raise MemoptError(f"narrow: width must be in (0, 1], got {width!r}")
    student = copy.deepcopy(teacher)
    if width < 1:
        prune_(student, Structured(1 - width, heads=False), calib=calib)
    return _trainable(student)


def _trainable(student: nn.Module) -> nn.Module:
    """A copy of a frozen teacher is frozen too; a student must train."""
    for p in student.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return student


# --------------------------------------------------------------------------------------------------
# Training loop


def _forward(model: nn.Module, batch: Batch, hidden: bool) -> dict[str, Any]:
    """``{"logits", "hidden", "labels"}`` of one batch: a dict (keyword inputs, ``labels`` taken
    out) for transformers models, or ``(x, y)`` / ``x`` for plain modules."""
    labels = None
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch.get("labels")
        out = model(**inputs, output_hidden_states=True) if hidden else model(**inputs)
        logits = getattr(out, "logits", None)
        hs = getattr(out, "hidden_states", None)
        if logits is None:  # an encoder: its last hidden state is what it outputs
            hs = hs if hs is not None else (out.last_hidden_state,)
        return {"logits": logits, "hidden": hs, "labels": labels,
                "mask": inputs.get("attention_mask")}  # fmt: skip
    x, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
    return {"logits": model(x), "hidden": None, "labels": labels, "mask": None}


class Distiller:
    """Trains ``student`` to imitate ``teacher`` (frozen, eval mode) with AdamW; checkpoints (when
    ``checkpoint_dir`` is given) are a :class:`~memopt.step.trainer.TrainState` of the student's
    trainable parameters, its buffers and the optimizer."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        config: DistillConfig | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
    ) -> None:
        self.teacher, self.student = teacher.eval(), student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.config = config or DistillConfig()
        self.dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        torch.manual_seed(self.config.seed)
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        if not named:
            raise MemoptError("distill: the student has no trainable parameters")
        self.opt = torch.optim.AdamW(
            [p for _, p in named], lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        saved = student.state_dict(keep_vars=True)  # persistent buffers only
        buffers = {n: b for n, b in student.named_buffers() if n in saved}
        self._state = TrainState(
            [n for n, _ in named], [p for _, p in named], self.opt, buffers=buffers
        )
        self.step = 0
        self.history: list[dict[str, float]] = []

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        keep = getattr(self.student, "memopt_keep", None)
        want_hidden = cfg.hidden_weight > 0
        with torch.no_grad():
            t = _forward(self.teacher, batch, want_hidden)
        s = _forward(self.student, batch, want_hidden)
        parts: dict[str, float] = {}
        total = torch.zeros(())
        if s["logits"] is not None:
            kd = kd_loss(s["logits"], t["logits"], s["labels"], temperature=cfg.temperature,
                         alpha=cfg.alpha)  # fmt: skip
            parts["kd"] = float(kd.detach())
            total = total + kd
        sh, th = s["hidden"], t["hidden"]
        if s["logits"] is None and sh is not None:  # an encoder: its output is what it is for
            out = _masked_mse(sh[-1], th[-1], s["mask"])
            cos = (
                1
                - F.cosine_similarity(
                    _pool(sh[-1], s["mask"]), _pool(th[-1], s["mask"]).detach(), dim=-1
                ).mean()
            )  # what a sentence embedding is compared by
            parts["output"], parts["cosine"] = float(out.detach()), float(cos.detach())
            total = total + out + cos
        if want_hidden and sh is not None and len(sh) > 1:
            # each student block's output against the output of the teacher block it came from
            # (entry 0 of hidden_states is the embeddings, block j's output is entry j + 1)
            tmap = [k + 1 for k in keep] if keep is not None else list(range(1, len(sh)))
            hl = torch.stack([
                _masked_mse(a, th[j], s["mask"]) for a, j in zip(sh[1:], tmap, strict=True)
            ]).mean()  # fmt: skip
            parts["hidden"] = float(hl.detach())
            total = total + cfg.hidden_weight * hl
        parts["loss"] = float(total.detach())
        return total, parts

    def train(
        self,
        data: Sequence[Batch] | Callable[[int], Batch],
        *,
        resume: bool | None = None,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> DistillResult:
        """Train to ``config.steps``. ``resume``: None continues from the checkpoint in
        ``checkpoint_dir`` when there is one, True requires one (:class:`MemoptError` if none),
        False starts afresh (later checkpoints replace the old one). ``stop_after``: stop (as an
        interruption would) after that many steps of this call."""
        if resume:
            if self.dir is None:
                raise MemoptError("distill: resume=True needs a checkpoint_dir")
            if not has_state(self.dir):
                raise MemoptError(f"distill: no checkpoint to resume from in {self.dir}")
        resumed = self.load_checkpoint() if resume is not False and self.dir is not None else 0
        get = data if callable(data) else (lambda i: data[i % len(data)])  # type: ignore[index]
        cfg = self.config
        self.student.train(self.config.dropout)
        bar, task = _progress(progress, cfg.steps, self.step)
        done_here = 0
        try:
            while self.step < cfg.steps:
                for group in self.opt.param_groups:
                    group["lr"] = cfg.lr_at(self.step)
                loss, parts = self.loss(get(self.step))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.step += 1
                done_here += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.history.append({"step": self.step, **parts})
                if self.dir is not None and (
                    self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                ):
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(task, advance=1, description=f"distill loss {parts['loss']:.4f}")
                if stop_after is not None and done_here >= stop_after:
                    break
        finally:
            if bar is not None:
                bar.stop()
        self.student.eval()
        return DistillResult(self.step, resumed, list(self.history))

    # ---- checkpoints: memopt.step.trainer's format ----

    def save_checkpoint(self) -> Path:
        """Write the checkpoint (:meth:`TrainState.save <memopt.step.trainer.TrainState.save>`)
        into ``checkpoint_dir``; returns that folder."""
        assert self.dir is not None
        extra = {"history": self.history, "config": asdict(self.config)}
        self._state.save(self.dir, self.step, extra=extra)
        return self.dir

    def load_checkpoint(self) -> int:
        """Restore the latest checkpoint (returns its step; 0 if there is none)."""
        assert self.dir is not None
        if not has_state(self.dir):
            return 0
        meta = self._state.load(self.dir)
        self.step = int(meta["steps_done"])
        self.history = list(meta["extra"].get("history", []))
        return self.step


def _pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens: (B, T, H) -> (B, H), as sentence-transformers pools."""
    if mask is None:
        return h.float().mean(1)
    m = mask.unsqueeze(-1).float()
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def _masked_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE over real tokens only ((B, T, H) with mask (B, T)): padding carries no signal."""
    if mask is None:
        return F.mse_loss(s.float(), t.float().detach())
    m = mask.unsqueeze(-1).to(s.dtype)  # (B, T, 1)
    diff = (s.float() - t.float().detach()).pow(2) * m
    return diff.sum() / (m.sum() * s.shape[-1]).clamp_min(1.0)


def _progress(enabled: bool, total: int, start: int) -> tuple[Any, Any]:
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    # stderr: stdout stays clean for --json
    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), transient=True, console=Console(stderr=True))  # fmt: skip
    task = bar.add_task("distill", total=total, completed=start)
    bar.start()
    return bar, task


# --------------------------------------------------------------------------------------------------
# Sentence encoders: a quality metric and a ready-made run (minilm -> half depth)


def paragraph_pairs(
    topics: Sequence[str] | None = None, n: int | None = None
) -> list[tuple[str, str]]:
    """``(first half, second half)`` of the paragraphs (24 words or more, at most 120 kept; code
    and tables skipped) of pydoc_data.topics' ``topics`` (default :func:`heldout_topics`), the
    first ``n`` of them if given."""
    all_topics = texts.topics()
    names = list(topics) if topics is not None else heldout_topics()
    pairs = []
    for name in names:
        for para in re.split(r"\n\s*\n", all_topics.get(name, "")):
            words = " ".join(para.split()).split(" ")
            if len(words) < 24 or para.lstrip().startswith(("*", ">>>", "|")):
                continue
            words = words[:120]
            half = len(words) // 2
            pairs.append((" ".join(words[:half]), " ".join(words[half:])))
    return pairs if n is None else pairs[:n]


def retrieval_scores(loaded: Any, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Same-paragraph retrieval: each first half queries all second halves by the cosine of the
    model's mean-pooled embeddings. ``top1``: the fraction whose own second half ranks first;
    ``mrr``: the mean of 1 / its rank (credit for near misses: a steadier figure on a few hundred
    queries). A task an embedding model is for, on text the student never trained on."""
    from memopt.evaluate import embed

    with torch.no_grad():
        q = F.normalize(embed(loaded, [a for a, _ in pairs]), dim=-1)  # (N, H)
        d = F.normalize(embed(loaded, [b for _, b in pairs]), dim=-1)  # (N, H)
    sim = q @ d.t()  # (N, N)
    own = sim.diagonal()[:, None]  # (N, 1)
    rank = (sim > own).sum(1) + 1  # (N,) 1 = retrieved first
    return {"top1": float((rank == 1).float().mean()), "mrr": float((1.0 / rank).mean())}


def retrieval_accuracy(loaded: Any, pairs: list[tuple[str, str]]) -> float:
    """Top-1 of :func:`retrieval_scores`."""
    return retrieval_scores(loaded, pairs)["top1"]


def _train_batches(tokenizer: Any, batch: int, seq: int, seed: int = 0) -> list[dict]:
    """Every sentence of the calibration topics (never the held-out ones) once, in a seeded
    shuffled order, tokenized per batch of ``batch``; the Distiller cycles through them."""
    flat = re.sub(r"\s+", " ", default_calib_text())
    sents = [s for s in re.split(r"(?<=[.!?])\s+", flat) if 30 <= len(s) <= 400]
    if len(sents) < batch:
        raise MemoptError("too few training sentences in the calibration text")
    order = torch.randperm(len(sents), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for i in range(0, len(order) - batch + 1, batch):
        chunk = [sents[j] for j in order[i : i + batch]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=seq, return_tensors="pt")
        out.append(dict(enc))
    return out


def _lm_batches(tokenizer: Any, n_batches: int, batch: int, seq: int) -> list[dict]:
    """Causal-LM batches of calibration-topic token ids, labels = the next token (-100: none)."""
    from memopt.quant.calibrate import calibration_ids

    ids = calibration_ids(tokenizer, n=n_batches * batch, seq=seq + 1)  # (n*B, seq+1)
    out = []
    for i in range(0, ids.shape[0] - batch + 1, batch):
        chunk = ids[i : i + batch]
        out.append({"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]})  # (B, seq) each
    return out


STUDENTS = "half-depth | keep=I,J,... | width=F"


def make_student(teacher: Any, spec: str | Sequence[int] = "half-depth") -> nn.Module:
    """The student of a LoadedModel ``teacher`` from a spec: ``half-depth`` (every other block,
    :func:`drop_layers`), ``keep=1,3,5`` (those blocks) or ``width=0.5`` (that fraction of the FFN
    neurons, :func:`narrow`, ranked on calibration text), or a list of block indices."""
    kind, value = parse_student(spec)
    if kind == "keep":
        return drop_layers(teacher.model, value)
    if kind == "width":
        from memopt.prune import calibration_ids

        calib = calibration_ids(teacher, 16, 128) if value < 1 else None
        return narrow(teacher.model, value, calib)
    return drop_layers(teacher.model)


def parse_student(spec: str | Sequence[int]) -> tuple[str, Any]:
    """``("half-depth", None)``, ``("keep", [i, ...])`` or ``("width", f)``; checked before any
    model is loaded (MemoptError for a malformed spec)."""
    if not isinstance(spec, str):
        return "keep", [int(i) for i in spec]
    if spec in ("half-depth", "every_other"):
        return "half-depth", None
    key, _, val = spec.partition("=")
    try:
        if key == "keep" and val:
            return "keep", [int(v) for v in val.split(",")]
        if key == "width" and val and 0 < float(val) <= 1:
            return "width", float(val)
    except ValueError:
        pass
    raise MemoptError(f"unknown student {spec!r} (expected {STUDENTS}, 0 < F <= 1)")


@releases_outputs
def distill_model(
    teacher: Any = "minilm",
    *,
    student: str | Sequence[int] = "half-depth",
    steps: int = 600,
    batch: int = 16,
    seq: int = 64,
    lr: float | None = None,
    temperature: float = 2.0,
    hidden_weight: float = 1.0,
    schedule: str = "cosine",
    warmup: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """What ``memopt distill TEACHER --student S --steps N -o DIR`` calls.

    The student (:func:`make_student`; default every other block, initialised from the teacher's
    blocks) is trained on pydoc_data.topics calibration text (never the held-out topics) with
    AdamW, ``lr`` (> 0; default encoder 3e-4, causal LM 2e-4) on a ``schedule`` after ``warmup``
    steps (default a twentieth of the run), checkpointed every ``checkpoint_every`` steps (default
    a quarter of the run) to ``checkpoint_dir`` (default ``OUT.checkpoints`` beside ``out_dir``;
    no checkpoints without either). ``resume``: None continues from a checkpoint there when there
    is one, True requires one (:class:`MemoptError` before anything loads if there is none), False
    starts afresh. Every option is checked before the teacher loads.

    A sentence encoder learns its output (masked hidden-state MSE + cosine of the mean-pooled
    embeddings) plus ``hidden_weight`` x each kept block's output against the teacher block it came
    from; it is scored by same-paragraph retrieval MRR on held-out pydoc paragraphs
    (:func:`retrieval_scores`; top-1 and embedding cosine to the teacher are reported beside). A
    causal LM learns soft targets at ``temperature`` plus next-token labels (and the hidden states
    when ``hidden_weight``), scored by 1 / perplexity. ``retained`` = student / teacher metric.
    Returns sizes in bytes (``teacher_bytes``, ``student_bytes``, ``disk_bytes``: the saved student,
    None without ``out_dir``), the metric before and after, ``retained``, the run's steps and
    ``checkpoint_dir`` (None: no checkpoints).
    """
    from memopt.models import LoadedModel, load_model

    if out_dir is not None:
        from memopt.models.saved import check_output

        check_output(out_dir)
    if not isinstance(steps, int) or steps < 1:
        raise MemoptError(f"distill: steps must be a whole number >= 1, got {steps!r}")
    if lr is not None and not lr > 0:
        raise MemoptError(f"distill: lr must be > 0, got {lr!r}")
    parse_student(student)
    if checkpoint_dir is None and out_dir is not None:
        checkpoint_dir = _checkpoints_beside(out_dir)
    ckpt = Path(checkpoint_dir).expanduser() if checkpoint_dir is not None else None
    if resume and (ckpt is None or not has_state(ckpt)):
        raise MemoptError(f"distill: resume: no checkpoint in {ckpt}")
    common = dict(steps=steps, temperature=temperature, hidden_weight=hidden_weight,
                  schedule=schedule, warmup=steps // 20 if warmup is None else warmup,
                  checkpoint_every=checkpoint_every or max(1, steps // 4))  # fmt: skip
    DistillConfig(lr=lr or 1e-3, **common)  # refuse a bad option before loading anything
    # the student is built from the teacher's weights and trained: a GGUF's float weights
    t = teacher if isinstance(teacher, LoadedModel) else load_model(teacher, dequantize=True)
    if t.task not in ("encoder", "causal-lm"):
        raise MemoptError(f"{t.name}: distill needs a transformers encoder or causal LM")
    student_model = make_student(t, student)
    s = LoadedModel(student_model, t.task, f"{t.name}-student", student_model.config, t.source,
                    _tokenizer=t.tokenizer())  # fmt: skip
    encoder = t.task == "encoder"
    extra: dict[str, Callable[[LoadedModel], float]] = {}
    if encoder:
        pairs = paragraph_pairs()
        scores: dict[int, dict[str, float]] = {}

        def _scores(m: LoadedModel) -> dict[str, float]:
            if id(m) not in scores or m is s:  # the student changes: score it afresh
                scores[id(m)] = retrieval_scores(m, pairs)
            return scores[id(m)]

        def quality(m: LoadedModel) -> float:
            return _scores(m)["mrr"]

        extra["top1"] = lambda m: _scores(m)["top1"]
        metric = (
            f"same-paragraph retrieval MRR over {len(pairs)} held-out pydoc paragraphs "
            "(mean-pooled embeddings, cosine)"
        )
        data = _train_batches(t.tokenizer(), batch, seq)
        cfg = DistillConfig(lr=lr or 3e-4, **common)
    else:
        from memopt.evaluate import perplexity

        def quality(m: LoadedModel) -> float:
            return 1.0 / perplexity(m, max_tokens=1024).perplexity

        metric = "1 / perplexity on 1,024 tokens of the evaluation text"
        data = _lm_batches(t.tokenizer(), min(steps, 32), batch, seq)
        cfg = DistillConfig(alpha=0.5, lr=lr or 2e-4, **common)
    q_teacher, q_before = quality(t), quality(s)
    before_extra = {k: f(s) for k, f in extra.items()}
    distiller = Distiller(t.model, s.model, cfg, checkpoint_dir=ckpt)
    result = distiller.train(data, progress=progress, resume=resume)
    q_student = quality(s)
    keep = getattr(student_model, "memopt_keep", None)  # None: a narrowed student
    out: dict[str, Any] = {
        "teacher": t.name,
        "student": student if isinstance(student, str) else f"keep={','.join(map(str, student))}",
        "teacher_layers": len(require_blocks(t.model, "distill")[1]),
        "student_layers": len(keep)
        if keep is not None
        else len(require_blocks(s.model, "distill")[1]),
        "kept_blocks": keep,
        "teacher_params": sum(p.numel() for p in t.model.parameters()),
        "student_params": sum(p.numel() for p in s.model.parameters()),
        "teacher_bytes": model_bytes(t.model),
        "student_bytes": model_bytes(s.model),
        "quality_metric": metric,
        "quality_teacher": q_teacher,
        "quality_student_before": q_before,
        "quality_student": q_student,
        "retained": q_student / q_teacher if q_teacher else 0.0,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "config": asdict(cfg),
        "disk_bytes": None,
        "checkpoint_dir": str(ckpt) if ckpt is not None else None,
    }
    for k, f in extra.items():
        out[f"{k}_teacher"], out[f"{k}_student_before"] = f(t), before_extra[k]
        out[f"{k}_student"] = f(s)
        out[f"{k}_retained"] = out[f"{k}_student"] / out[f"{k}_teacher"] if f(t) else 0.0
    if encoder:
        from memopt.evaluate import embedding_cosine

        with torch.no_grad():
            cos = embedding_cosine(s, t, [b for _, b in pairs])
        out.update(cosine_mean=cos.cosine_mean, cosine_min=cos.cosine_min)
    if out_dir is not None:
        from memopt.models.saved import disk_bytes, save

        save(s, out_dir)
        out["disk_bytes"] = disk_bytes(out_dir)
    return out


def _checkpoints_beside(out_dir: str | Path) -> Path:
    """``OUT.checkpoints``, the default checkpoint folder of a run writing ``OUT``."""
    out = Path(out_dir).expanduser()
    if out.name in ("", ".", ".."):
        out = out.resolve()
    return out.with_name(out.name + ".checkpoints")
