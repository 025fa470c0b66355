"""Knowledge distillation: a smaller student learns from a teacher.

    student = drop_layers(teacher)                       # every other block, teacher's weights
    result = Distiller(teacher, student, DistillConfig(steps=300), checkpoint_dir="ck").train(data)

Loss (Hinton et al. 2015): ``alpha * T² * KL(softmax(t/T) ‖ softmax(s/T)) + (1 - alpha) * CE(s, y)``
(the T² keeps the soft term's gradients the same size whatever T), plus ``hidden_weight`` times the
mean squared error between student hidden states and the teacher's layers they were copied from.
A model without logits (a sentence encoder) is distilled on its hidden states alone.

``data`` is indexed by step (a sequence, used cyclically, or a function ``step -> batch``), so a run
resumed from a checkpoint sees exactly the batches it would have seen: checkpoints (student weights,
optimizer state, RNG state in safetensors; step, history and config in JSON; never pickle) are
written every ``checkpoint_every`` steps, atomically, and ``train()`` continues from the latest.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memopt.errors import MemoptError

__all__ = [
    "DistillConfig",
    "DistillResult",
    "Distiller",
    "distill_model",
    "drop_layers",
    "hidden_loss",
    "kd_loss",
    "narrow",
    "paragraph_pairs",
    "retrieval_accuracy",
]

Batch = Any
CKPT_WEIGHTS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"


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

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise MemoptError(f"distill: temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise MemoptError(f"distill: alpha must be in [0, 1], got {self.alpha!r}")
        if self.steps < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise MemoptError("distill: steps, checkpoint_every and log_every must be >= 1")
        if self.hidden_weight < 0 or self.lr <= 0:
            raise MemoptError("distill: hidden_weight must be >= 0 and lr > 0")


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


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of identical blocks (transformer layers)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        same = isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
        if same and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise MemoptError("drop_layers: the model has no list of repeated blocks")
    return best


def drop_layers(teacher: nn.Module, keep: Sequence[int] | str = "every_other") -> nn.Module:
    """A student with a subset of the teacher's blocks, initialised from their weights.

    ``"every_other"`` keeps blocks L-1, L-3, ... (half, rounded up; the last block stays, since its
    output is what the head / pooling was trained on). The config's ``num_hidden_layers`` and each
    kept block's ``layer_idx`` (its key-value cache slot) are renumbered. ``student.memopt_keep``
    records the kept teacher blocks, for :func:`hidden_loss`."""
    student = copy.deepcopy(teacher)
    name, blocks = _blocks(student)
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
    """Trains ``student`` to imitate ``teacher`` (frozen, eval mode) with AdamW."""

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
        self.opt = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
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
        if s["hidden"] is not None and (want_hidden or s["logits"] is None):
            sh, th = s["hidden"], t["hidden"]
            if s["logits"] is None and not want_hidden:  # encoder output only
                hl = _masked_mse(sh[-1], th[-1], s["mask"])
                cos = (
                    1
                    - F.cosine_similarity(
                        _pool(sh[-1], s["mask"]), _pool(th[-1], s["mask"]).detach(), dim=-1
                    ).mean()
                )  # what a sentence embedding is compared by
                parts["cosine"] = float(cos.detach())
                hl = hl + cos
            else:
                first = 1 if len(sh) > 1 else 0  # skip the embeddings entry
                tmap = [k + 1 for k in keep] if keep is not None else list(range(first, len(sh)))
                hl = hidden_loss(sh[first:], th, tmap)
            w = cfg.hidden_weight if want_hidden else 1.0
            parts["hidden"] = float(hl.detach())
            total = total + w * hl
        parts["loss"] = float(total.detach())
        return total, parts

    def train(
        self,
        data: Sequence[Batch] | Callable[[int], Batch],
        *,
        resume: bool = True,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> DistillResult:
        """Train to ``config.steps``, resuming from the checkpoint in ``checkpoint_dir`` if any.
        ``stop_after``: stop (as an interruption would) after that many steps of this call."""
        resumed = self.load_checkpoint() if (resume and self.dir is not None) else 0
        get = data if callable(data) else (lambda i: data[i % len(data)])  # type: ignore[index]
        cfg = self.config
        self.student.train(self.config.dropout)
        bar, task = _progress(progress, cfg.steps, self.step)
        done_here = 0
        try:
            while self.step < cfg.steps:
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

    # ---- checkpoints: safetensors + JSON ----

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.student.state_dict().items():
            tensors[f"student.{k}"] = v.detach().clone().contiguous()  # clone: ties share storage
        opt = self.opt.state_dict()
        opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
        for idx, st in opt["state"].items():
            opt_meta["state"][str(idx)] = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt.{idx}.{k}"] = v.detach().clone().contiguous()
                else:
                    opt_meta["state"][str(idx)][k] = v
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"step": self.step, "history": self.history, "config": asdict(self.config),
                "optimizer": opt_meta, "format": "memopt-distill-checkpoint", "version": 1}  # fmt: skip
        tmp_w, tmp_m = self.dir / (CKPT_WEIGHTS + ".tmp"), self.dir / (CKPT_META + ".tmp")
        save_file(tensors, str(tmp_w))
        tmp_m.write_text(json.dumps(meta))
        os.replace(tmp_w, self.dir / CKPT_WEIGHTS)  # weights first, then the JSON that names the
        os.replace(tmp_m, self.dir / CKPT_META)  # step: a crash between leaves an older step
        return self.dir

    def load_checkpoint(self) -> int:
        """Restore the latest checkpoint (returns its step; 0 if there is none)."""
        from safetensors.torch import load_file

        assert self.dir is not None
        meta_p, w_p = self.dir / CKPT_META, self.dir / CKPT_WEIGHTS
        if not meta_p.is_file() or not w_p.is_file():
            return 0
        try:
            meta = json.loads(meta_p.read_text())
            tensors = load_file(str(w_p))
        except (OSError, ValueError) as exc:
            raise MemoptError(f"{self.dir}: corrupt distillation checkpoint ({exc})") from None
        sd = {k[len("student.") :]: v for k, v in tensors.items() if k.startswith("student.")}
        self.student.load_state_dict(sd)
        om = meta["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            m = re.fullmatch(r"opt\.(\d+)\.(.+)", key)
            if m:
                state.setdefault(int(m.group(1)), {})[m.group(2)] = v
        for idx, extra in om["state"].items():
            state.setdefault(int(idx), {}).update(extra)
        self.opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        self.history = list(meta["history"])
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), transient=True)  # fmt: skip
    task = bar.add_task("distill", total=total, completed=start)
    bar.start()
    return bar, task


# --------------------------------------------------------------------------------------------------
# Sentence encoders: a quality metric and a ready-made run (minilm -> half depth)


def paragraph_pairs(topics: Sequence[str] | None = None, n: int = 200) -> list[tuple[str, str]]:
    """``(first half, second half)`` of up to ``n`` paragraphs of pydoc_data.topics (default: the
    evaluation topics' paragraphs, memopt.evaluate._TOPICS, which calibration and training avoid)."""
    from pydoc_data.topics import topics as all_topics

    from memopt.evaluate import _TOPICS

    names = list(topics) if topics is not None else list(_TOPICS)
    pairs = []
    for name in names:
        for para in re.split(r"\n\s*\n", all_topics.get(name, "")):
            words = " ".join(para.split()).split(" ")
            if len(words) < 24 or para.lstrip().startswith(("*", ">>>", "|")):
                continue
            words = words[:120]
            half = len(words) // 2
            pairs.append((" ".join(words[:half]), " ".join(words[half:])))
    return pairs[:n]


def retrieval_accuracy(loaded: Any, pairs: list[tuple[str, str]]) -> float:
    """Same-paragraph retrieval: for each first half, is the nearest second half (by the model's
    mean-pooled embedding cosine) its own? The fraction right: a task an embedding model is for,
    scored on text the student never trained on."""
    from memopt.evaluate import embed

    q = F.normalize(embed(loaded, [a for a, _ in pairs]), dim=-1)  # (N, H)
    d = F.normalize(embed(loaded, [b for _, b in pairs]), dim=-1)  # (N, H)
    hit = (q @ d.t()).argmax(1) == torch.arange(len(pairs))
    return float(hit.float().mean())


def _train_batches(tokenizer: Any, n_batches: int, batch: int, seq: int) -> list[dict]:
    """Sentences of the calibration topics (not the evaluation ones), tokenized per batch."""
    from memopt.quant.calibrate import default_calib_text

    flat = re.sub(r"\s+", " ", default_calib_text())
    sents = [s for s in re.split(r"(?<=[.!?])\s+", flat) if 30 <= len(s) <= 400]
    if not sents:
        raise MemoptError("no training sentences in the calibration text")
    out = []
    for i in range(n_batches):
        chunk = [sents[(i * batch + j) % len(sents)] for j in range(batch)]
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


def distill_model(
    teacher: Any = "minilm",
    *,
    keep: Sequence[int] | str = "every_other",
    steps: int = 200,
    batch: int = 16,
    seq: int = 64,
    lr: float = 2e-4,
    temperature: float = 2.0,
    checkpoint_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """What ``memopt distill TEACHER [--keep every_other|i,j,..] [--steps N] -o DIR`` calls.

    The student is the teacher with ``keep`` blocks (default every other: half depth), trained on
    pydoc_data.topics calibration text (never the evaluation topics). A sentence encoder is
    distilled on its output (masked hidden-state MSE + cosine of the mean-pooled embeddings) and
    scored by same-paragraph retrieval (:func:`retrieval_accuracy`) and embedding cosine to the
    teacher; a causal LM on soft targets at ``temperature`` plus next-token labels, scored by
    perplexity (retained = teacher perplexity / student perplexity). Returns a dict of sizes,
    qualities, ``retained`` and ``disk_bytes`` (the saved student; None without ``out_dir``).
    """
    from memopt.models import LoadedModel, load_model
    from memopt.quant.api import model_bytes

    if out_dir is not None:
        from memopt.io import check_output

        check_output(out_dir)
    t = teacher if isinstance(teacher, LoadedModel) else load_model(teacher)
    if t.task not in ("encoder", "causal-lm"):
        raise MemoptError(f"{t.name}: distill needs a transformers encoder or causal LM")
    student_model = drop_layers(t.model, keep)
    s = LoadedModel(student_model, t.task, f"{t.name}-student", student_model.config, t.source,
                    _tokenizer=t.tokenizer())  # fmt: skip
    encoder = t.task == "encoder"
    if encoder:
        pairs = paragraph_pairs()

        def quality(m: LoadedModel) -> float:
            return retrieval_accuracy(m, pairs)

        metric = f"same-paragraph retrieval top-1 over {len(pairs)} pydoc paragraphs"
        data = _train_batches(t.tokenizer(), min(steps, 64), batch, seq)
        cfg = DistillConfig(steps=steps, lr=lr, checkpoint_every=max(1, steps // 4))
    else:
        from memopt.evaluate import perplexity

        def quality(m: LoadedModel) -> float:
            return 1.0 / perplexity(m, max_tokens=1024).perplexity

        metric = "1 / perplexity on 1,024 tokens of the evaluation text"
        data = _lm_batches(t.tokenizer(), min(steps, 32), batch, seq)
        cfg = DistillConfig(temperature=temperature, alpha=0.5, steps=steps, lr=lr,
                            checkpoint_every=max(1, steps // 4))  # fmt: skip
    q_teacher, q_before = quality(t), quality(s)
    result = Distiller(t.model, s.model, cfg, checkpoint_dir=checkpoint_dir).train(
        data, progress=progress
    )
    q_student = quality(s)
    out: dict[str, Any] = {
        "teacher": t.name,
        "teacher_layers": len(_blocks(t.model)[1]),
        "student_layers": len(student_model.memopt_keep),
        "kept_blocks": list(student_model.memopt_keep),
        "teacher_bytes": model_bytes(t.model),
        "student_bytes": model_bytes(s.model),
        "quality_metric": metric,
        "quality_teacher": q_teacher,
        "quality_student_before": q_before,
        "quality_student": q_student,
        "retained": q_student / q_teacher if q_teacher else 0.0,
        "steps": result.steps,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "disk_bytes": None,
    }
    if encoder:
        from memopt.evaluate import embedding_cosine

        cos = embedding_cosine(s, t)
        out.update(cosine_mean=cos.cosine_mean, cosine_min=cos.cosine_min)
    if out_dir is not None:
        from memopt.io import disk_bytes, save

        save(s, out_dir)
        out["disk_bytes"] = disk_bytes(out_dir)
    return out
