"""What a saving costs in quality: perplexity for causal LMs, embedding fidelity for encoders.

The default text is the Python documentation that ships with every CPython (memopt.core.texts);
``--text FILE`` takes any other. :func:`heldout_perplexities` scores the held-out texts of several
domains (memopt.core.texts.HELDOUT: docs, legal, release notes, code), none of them calibration text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from memopt.core.errors import MemoptError
from memopt.core.texts import default_sentences, default_text, heldout_texts
from memopt.models import LoadedModel

__all__ = [
    "CosineResult",
    "PerplexityResult",
    "embed",
    "embedding_cosine",
    "heldout_perplexities",
    "perplexity",
]

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens whose loss was scored
    nll: float  # mean negative log-likelihood, nats per token
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CosineResult:
    cosine_min: float
    cosine_mean: float
    sentences: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    loaded: LoadedModel,
    text: str | None = None,
    *,
    max_tokens: int = 2048,
    window: int = 512,
    stride: int = 512,
    progress: ProgressFn | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on the first ``max_tokens`` tokens of ``text``.

    Windows of ``window`` tokens advance by ``stride``; each window scores only the tokens that no
    earlier window scored, so every token is scored once, with up to ``window - stride`` tokens of
    context carried over (stride == window: independent windows).
    """
    if loaded.task != "causal-lm":
        raise MemoptError(f"{loaded.name}: perplexity needs a causal language model")
    if not 1 <= stride <= window:
        raise MemoptError(f"stride must be in [1, window]; got stride {stride}, window {window}")
    tok = loaded.tokenizer()
    ids = tok(text if text is not None else default_text(), return_tensors="pt")["input_ids"][0]
    ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise MemoptError("the text has fewer than 2 tokens")
    model = loaded.model.eval()
    device = next(model.parameters()).device
    nll_sum, scored, prev_end = 0.0, 0, 0
    starts = list(range(0, ids.numel() - 1, stride))
    for i, begin in enumerate(starts):
        end = min(begin + window, ids.numel())
        chunk = ids[begin:end].unsqueeze(0).to(device)  # (1, T)
        logits = model(input_ids=chunk, use_cache=False).logits.float()  # (1, T, V)
        # Token t is predicted by position t-1; score only positions past what was scored before.
        first = max(prev_end, begin + 1) - begin
        targets = chunk[0, first:]  # (n,)
        lp = F.log_softmax(logits[0, first - 1 : -1], dim=-1)  # (n, V)
        nll_sum += -lp.gather(1, targets[:, None]).sum().item()
        scored += targets.numel()
        prev_end = end
        if progress is not None:
            progress(i + 1, len(starts))
        if end == ids.numel():
            break
    nll = nll_sum / scored
    return PerplexityResult(math.exp(nll), scored, nll, window, stride)


def heldout_perplexities(
    loaded: LoadedModel,
    names: list[str] | tuple[str, ...] | None = None,
    *,
    max_tokens: int = 2048,
    progress: ProgressFn | None = None,
) -> dict[str, PerplexityResult]:
    """Perplexity on each held-out text (memopt.core.texts.heldout_texts: every one this Python
    has, or ``names``), the first ``max_tokens`` tokens of each; ``progress`` counts windows over
    all the texts together."""
    texts = heldout_texts(names)
    if not texts:
        raise MemoptError("this Python has none of the held-out texts")
    per = -(-max_tokens // 512)  # windows per text at most (the default window is 512)
    total = per * len(texts)
    out = {}
    for i, (name, text) in enumerate(texts.items()):
        cb = None if progress is None else (lambda d, _t, i=i: progress(i * per + d, total))
        out[name] = perplexity(loaded, text, max_tokens=max_tokens, progress=cb)
    if progress is not None:
        progress(total, total)
    return out


@torch.no_grad()
def embed(loaded: LoadedModel, sentences: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled (attention-masked) last hidden states, as sentence-transformers does: (N, H)."""
    tok = loaded.tokenizer()
    model = loaded.model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i : i + batch_size], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state.float()  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(out)


def embedding_cosine(
    loaded: LoadedModel, reference: LoadedModel, sentences: list[str] | None = None
) -> CosineResult:
    """Per-sentence cosine between a model's embeddings and a reference's (e.g. float32)."""
    sentences = sentences or default_sentences()
    a, b = embed(loaded, sentences), embed(reference, sentences)
    cos = F.cosine_similarity(a, b, dim=-1)  # (N,)
    return CosineResult(float(cos.min()), float(cos.mean()), len(sentences))
