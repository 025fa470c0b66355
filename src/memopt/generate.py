"""Text generation with the KV cache, for float and quantized causal LMs alike.

One prefill forward over the prompt fills the cache and gives the first new token; each further
token is one decode forward of a single position against the cache. Timing separates the two:
``tokens_per_s`` is decode only (tokens after the first / decode seconds), because prefill cost
grows with the prompt and would blur a per-token speed; ``prefill_s`` is reported beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.engine import engine_for
from memopt.models import LoadedModel

__all__ = ["generate", "prompt_ids", "run_model"]


def prompt_ids(loaded: LoadedModel, prompt: str | list[int], chat: bool = False) -> torch.Tensor:
    """``(1, T)`` token ids of the prompt; ``chat=True`` wraps it in the model's chat template as
    one user turn followed by the assistant prompt."""
    if not isinstance(prompt, str):
        ids = torch.as_tensor(list(prompt), dtype=torch.long).reshape(1, -1)
        if ids.numel() == 0:
            raise MemoptError("the prompt is empty")
        return ids
    tok = loaded.tokenizer()
    if chat:
        if not getattr(tok, "chat_template", None):
            raise MemoptError(f"{loaded.name}: the tokenizer has no chat template (drop --chat)")
        out: Any = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        ids = torch.as_tensor(out, dtype=torch.long).reshape(1, -1)
    else:
        ids = torch.as_tensor(tok(prompt)["input_ids"], dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0:
        raise MemoptError("the prompt is empty (no tokens)")
    return ids


def _eos_ids(loaded: LoadedModel) -> set[int]:
    """End-of-sequence ids from the model's generation config, its config and its tokenizer."""
    found: set[int] = set()
    sources = [getattr(loaded.model, "generation_config", None), loaded.config]
    for src in sources:
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            found.add(eos)
        elif isinstance(eos, (list, tuple)):
            found.update(int(e) for e in eos)
    try:
        tok_eos = loaded.tokenizer().eos_token_id
    except MemoptError:
        tok_eos = None
    if isinstance(tok_eos, int):
        found.add(tok_eos)
    return found


def _cache_arg(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` in recent transformers (which warns about
    the older ``past_key_values``), ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompt: str | list[int],
    max_new_tokens: int = 32,
    greedy: bool = True,
    *,
    chat: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    warmup: bool = True,
    engine: bool | None = None,
    kv_int8: bool = False,
) -> dict[str, Any]:
    """Generate up to ``max_new_tokens`` after ``prompt`` (text, or token ids).

    Greedy (argmax) by default; ``greedy=False`` samples at ``temperature`` from a generator seeded
    with ``seed`` (so it is repeatable too). Returns ``text`` (the new tokens decoded; None when the
    model has no tokenizer), ``tokens`` (new token ids), ``prompt_tokens``, ``prefill_s``,
    ``decode_s``, ``tokens_per_s`` (decode only: ``(len(tokens) - 1) / decode_s``; None with fewer
    than 2 new tokens).

    ``warmup``: first run the prompt and one decode step untimed, so that one-time costs (kernel
    autotuning per shape, allocator growth, lazy initialisation) stay out of ``prefill_s`` and
    ``tokens_per_s``; the tokens are the same either way.

    ``engine``: run the tokens through memopt's decode engine (memopt.engine: one C call a token
    over the model's own tensors) when it can run this model (None, the default), always (True: a
    model it cannot run is an error) or never (False: transformers' forward). ``engine`` in the
    result says which ran. ``kv_int8``: an int8 KV cache (the engine's own, or on transformers'
    forward memopt.weights.kvcache's).
    """
    if loaded.task != "causal-lm":
        raise MemoptError(f"{loaded.name}: generation needs a causal language model")
    if max_new_tokens < 1:
        raise MemoptError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise MemoptError(f"temperature must be positive, got {temperature}")
    model = loaded.model
    ids = prompt_ids(loaded, prompt, chat)  # (1, T)
    eos = _eos_ids(loaded) if stop_at_eos else set()
    gen = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor) -> int:  # logits (1, V) -> one token id
        if greedy:
            return int(logits.argmax(-1))
        probs = torch.softmax(logits.float() / temperature, -1)
        return int(torch.multinomial(probs, 1, generator=gen))

    eng = None
    if engine is not False:
        eng = engine_for(model, loaded.config, int(ids.shape[1]) + max_new_tokens, kv_int8)
        if eng is None and engine:
            raise MemoptError(f"{loaded.name}: memopt's decode engine cannot run this model")
    if eng is not None:
        return _generate_engine(loaded, eng, ids[0].tolist(), max_new_tokens, pick, eos, warmup)
    if kv_int8:  # transformers' forward on memopt's int8 cache (a second install changes nothing)
        from memopt.weights.kvcache import use_int8_kv_cache

        use_int8_kv_cache(model, loaded.config)
    cache_arg = _cache_arg(model)
    if warmup:
        out = model(input_ids=ids, use_cache=True)
        step = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        model(input_ids=step, use_cache=True, **{cache_arg: _cache_of(out)})
        del out
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)  # prefill: (1, T) -> logits (1, T, V)
    cache = _cache_of(out)
    tokens = [pick(out.logits[:, -1])]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        step = torch.tensor([[tokens[-1]]])  # (1, 1): one new position against the cache
        out = model(input_ids=step, use_cache=True, **{cache_arg: cache})
        cache = _cache_of(out)
        tokens.append(pick(out.logits[:, -1]))
    decode_s = time.perf_counter() - start
    return _result(loaded, tokens, int(ids.shape[1]), prefill_s, decode_s, "transformers")


def _generate_engine(
    loaded: LoadedModel,
    eng: Any,
    ids: list[int],
    max_new_tokens: int,
    pick: Any,
    eos: set[int],
    warmup: bool,
) -> dict[str, Any]:
    """:func:`generate` through memopt's decode engine: the prompt one position at a time (each a
    matrix-vector product per weight, as a decode step is), then the new tokens."""
    if warmup:  # the library's first load and the weights' first page faults
        for pos, tok in enumerate(ids[:2]):
            eng.forward(tok, pos)
    start = time.perf_counter()
    for pos, tok in enumerate(ids):
        logits = eng.forward(tok, pos)  # (V,)
    tokens = [pick(logits[None])]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        logits = eng.forward(tokens[-1], len(ids) + len(tokens) - 1)
        tokens.append(pick(logits[None]))
    decode_s = time.perf_counter() - start
    return _result(loaded, tokens, len(ids), prefill_s, decode_s, "memopt")


def _result(
    loaded: LoadedModel,
    tokens: list[int],
    prompt: int,
    prefill_s: float,
    decode_s: float,
    engine: str,
) -> dict[str, Any]:
    try:
        text = loaded.tokenizer().decode(tokens, skip_special_tokens=True)
    except MemoptError:
        text = None
    return {
        "text": text,
        "tokens": tokens,
        "prompt_tokens": prompt,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else None,
        "engine": engine,
    }


def run_model(
    model: str | Path,
    prompt: str,
    max_new_tokens: int = 32,
    *,
    greedy: bool = True,
    chat: bool = False,
    progress: Any = None,
    kv_int8: bool = False,
) -> dict[str, Any]:
    """What ``memopt run MODEL`` does without a memory budget: greedy text straight from the files
    through the decode engine when it can (memopt.engine.lean: no transformers, no module built),
    else the full load and :func:`generate`. The result is :func:`generate`'s, tokens identical.
    ``kv_int8``: an int8 KV cache (the engine's, or memopt.weights.kvcache's)."""
    from memopt.models import load_model, resolve

    if max_new_tokens < 1:
        raise MemoptError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    source = resolve(model)
    if greedy and not chat:
        from memopt.engine.lean import open_model

        lean = open_model(source.path, _lean_positions(prompt, max_new_tokens), kv_int8)
        if lean is not None:
            ids = lean.encode(prompt)
            if len(ids) + max_new_tokens <= lean.engine.max_seq:
                return lean.generate(ids, max_new_tokens)
    loaded = load_model(source, progress=progress)
    if loaded.task != "causal-lm":
        raise MemoptError(f"{source.name} is not a causal language model: nothing to generate")
    return generate(loaded, prompt, max_new_tokens, greedy=greedy, chat=chat, kv_int8=kv_int8)


def _lean_positions(prompt: str, max_new_tokens: int) -> int:
    # a token is at least one byte of a byte-level vocabulary: the prompt's bytes bound its ids
    return len(prompt.encode()) + 2 + max_new_tokens
