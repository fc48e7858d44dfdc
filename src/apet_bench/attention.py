"""Attention probabilities of a few query rows at one decoder layer, while every layer keeps sdpa / flash.

FastV, SparseVLM, PDrop and ApET's LLM stage score visual tokens with the attention of one query row
(e.g. the last prompt token) at one layer. ``output_attentions=True`` would need ``eager`` attention in
every layer and materialise ``num_layers x heads x L x L`` weights (docs/models.md);
sdpa and FlashAttention return none. :class:`AttentionRowCapture` instead wraps the attention function
of **one** attention module: the module gets a private config copy whose ``_attn_implementation`` names
a wrapper (registered once in transformers' ``AttentionInterface``) that

1. runs the model's own attention implementation (sdpa, flash_attention_2 or eager) unchanged, and
2. recomputes ``softmax(q_rows · kᵀ · scaling + mask)`` for the requested rows only, from the query
   and key states the module hands to its attention function: after the q/k projections, RoPE (Llama
   1-D or Qwen2.5-VL's mRoPE, whichever the module applied) and the KV-cache update; GQA heads are
   repeated as in ``repeat_kv``. The mask is rebuilt from whatever the backend got: a 4-D additive
   (eager) or boolean (sdpa) mask, a 2-D padding mask (flash_attention_2), or ``None`` (causal).

Cost: ``O(batch x heads x rows x seq_len x head_dim)`` for that layer only. Every other layer, and the
wrapped layer's own output, stay on the configured backend. Checked against eager
``output_attentions`` of the same weights in ``tests/test_stage2.py``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from apet_bench.core import AttentionRequest, RowSpec, VisualModel

__all__ = [
    "ROWS_ATTN_IMPLEMENTATION",
    "AttentionRequest",
    "AttentionRowCapture",
    "attention_backends",
    "attention_rows",
    "resolve_rows",
]

#: Name under which the wrapper is registered in ``transformers.AttentionInterface``.
ROWS_ATTN_IMPLEMENTATION = "apet_bench_rows"
#: Attribute set on a wrapped attention module (removed on exit).
_CAPTURE_ATTR = "_apet_bench_row_capture"

def resolve_rows(rows: RowSpec, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Turn a row spec into sorted-as-given, non-negative query indices.

    Parameters
    ----------
    rows : str or int or sequence of int
        ``"last"``, ``"all"``, an int, or ints; negative values count from the end.
    seq_len : int
        Query length of the layer's prefill sequence.

    Returns
    -------
    torch.Tensor
        ``(num_rows,)`` long.

    Raises
    ------
    ValueError
        For an unknown string, an empty sequence or a row outside ``[-seq_len, seq_len)``.
    """
    if isinstance(rows, str):
        if rows == "last":
            idx = [seq_len - 1]
        elif rows == "all":
            idx = list(range(seq_len))
        else:
            raise ValueError(f"attention rows {rows!r} unknown; use 'last', 'all', an int or a list of ints")
    elif isinstance(rows, int):
        idx = [rows]
    else:
        idx = [int(r) for r in rows]
    if not idx:
        raise ValueError("attention rows: empty selection")
    out = []
    for r in idx:
        if not -seq_len <= r < seq_len:
            raise ValueError(f"attention row {r} is outside a sequence of {seq_len} tokens")
        out.append(r % seq_len)
    return torch.tensor(out, dtype=torch.long, device=device)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    *,
    scaling: float,
    sliding_window: int | None = None,
    numerics: str = "fp32",
) -> torch.Tensor:
    """Attention probabilities of some query rows, as eager attention would compute them.

    Parameters
    ----------
    query : torch.Tensor
        ``(batch, num_heads, q_len, head_dim)`` after RoPE.
    key : torch.Tensor
        ``(batch, num_kv_heads, kv_len, head_dim)`` after RoPE and the cache update (GQA: repeated here).
    attention_mask : torch.Tensor or None
        What the backend got: 4-D ``(batch|1, 1|heads, q_len, >=kv_len)`` additive float (eager) or
        boolean "may attend" (sdpa); 2-D ``(batch, kv_len)`` padding mask with 1 = token (flash); or
        ``None`` (pure causal; the query block is the last ``q_len`` of the ``kv_len`` keys).
    rows : torch.Tensor
        ``(num_rows,)`` long indices into the ``q_len`` queries.
    scaling : float
        Softmax scale (``head_dim ** -0.5`` for Llama / Qwen2).
    sliding_window : int, optional
        Window of a sliding-window layer (only applied for 2-D / ``None`` masks; 4-D masks carry it).
    numerics : {"fp32", "official"}
        ``"fp32"``: scores from float32 copies of ``query`` / ``key``. ``"official"``: as eager attention
        in the model's dtype: ``matmul(q, kᵀ) * scaling`` and the additive mask in ``query``'s dtype,
        softmax in float32, probabilities cast back to ``query``'s dtype (what ``output_attentions``
        hands FastV / PDrop / SparseVLM in the official fp16 code).

    Returns
    -------
    torch.Tensor
        ``(batch, num_heads, num_rows, kv_len)`` probabilities (rows sum to 1 unless fully masked):
        float32 (``"fp32"``) or ``query``'s dtype (``"official"``).

    Raises
    ------
    ValueError
        Unknown ``numerics``, or a mask that is neither 2-D nor 4-D.

    Notes
    -----
    Follows ``eager_attention_forward`` in ``transformers/models/llama/modeling_llama.py`` (softmax in
    float32 there too). The 4.37-era forks of the official baselines divide the scores by ``√head_dim``
    instead of multiplying by ``scaling``: at most one rounding step of the model dtype apart.
    """
    if numerics not in ("fp32", "official"):
        raise ValueError(f"attention_rows: numerics must be 'fp32' or 'official', got {numerics!r}")
    cd = query.dtype if numerics == "official" else torch.float32
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    n_rep = h // key.shape[1]
    k = key if n_rep == 1 else key.repeat_interleave(n_rep, dim=1)  # == repeat_kv
    rows = rows.to(query.device)
    q = query.index_select(2, rows).to(cd)
    scores = torch.matmul(q, k.to(cd).transpose(2, 3)) * scaling  # (b, h, r, kv_len)
    if attention_mask is not None and attention_mask.ndim == 4:
        m = attention_mask[..., :kv_len]
        m = m.index_select(2, rows) if m.shape[2] == q_len else m
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m.to(cd)
    else:
        q_pos = rows + (kv_len - q_len)  # absolute positions of the query rows among the keys
        k_pos = torch.arange(kv_len, device=query.device)
        blocked = k_pos[None, :] > q_pos[:, None]  # (r, kv_len)
        if sliding_window is not None:
            blocked = blocked | (q_pos[:, None] - k_pos[None, :] >= sliding_window)
        blocked = blocked[None, None]
        if attention_mask is not None:  # 2-D padding mask
            if attention_mask.ndim != 2:
                raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} is neither 2-D nor 4-D")
            pad = ~attention_mask[:, -kv_len:].bool()
            blocked = blocked | pad[:, None, None, :]
        scores = scores.masked_fill(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs.to(query.dtype) if numerics == "official" else probs


def _rows_attention_forward(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """The registered wrapper: run the module's real backend, then record the requested rows.

    During :meth:`AttentionRowCapture.probe` the backend is skipped: only the rows are recorded and a
    zero ``(batch, q_len, heads, head_dim)`` output is returned (the probe's output is discarded).
    """
    capture: AttentionRowCapture = getattr(module, _CAPTURE_ATTR)
    if capture._probing:
        capture._record(query, key, attention_mask, kwargs, module)
        b, h, q_len, _ = query.shape
        return query.new_zeros((b, q_len, h, value.shape[-1])), None
    private = module.config
    module.config = capture._original_config  # backends such as flash read module.config
    try:
        out = capture._inner(module, query, key, value, attention_mask, *args, **kwargs)
    finally:
        module.config = private
    if capture.record_forward:
        capture._record(query, key, attention_mask, kwargs, module)
    return out


def _register_wrapper() -> None:
    from transformers import AttentionInterface

    if ROWS_ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ROWS_ATTN_IMPLEMENTATION, _rows_attention_forward)


class AttentionRowCapture:
    """Context manager: record attention probabilities of some query rows at one decoder layer.

    Only ``adapter.decoder_layers[layer].self_attn`` is touched (a private config copy pointing at the
    wrapper, restored on exit); the model's ``attn_implementation`` and every other layer are unchanged.
    A record is taken at every **prefill** call of that layer (query length == key length, i.e. empty
    cache; with ``use_cache=False`` every forward is one), never during decode.

    Parameters
    ----------
    adapter_or_layers : VisualModel or sequence of nn.Module
        The adapter (its :attr:`~apet_bench.models.base.VisualModel.decoder_layers` are used) or the
        decoder layers themselves; each must have a ``self_attn`` module (Llama, Qwen2, Qwen2.5-VL).
    layer : int
        Decoder layer index, ``0 <= layer < num_layers``.
    rows : str or int or sequence of int
        See :class:`AttentionRequest`.
    callback : callable, optional
        ``callback(probs)`` with each record, ``probs`` ``(batch, num_heads, num_rows, kv_len)`` float32.
    record_forward : bool
        ``True`` (default): record at every prefill forward of the layer. ``False``: record only in
        :meth:`probe` (PyramidDrop-style rows of a drop layer's pre-drop input).
    numerics : {"fp32", "official"}
        Passed to :func:`attention_rows` (``"official"``: probabilities in the model's dtype).

    Attributes
    ----------
    probs : torch.Tensor or None
        The latest record, ``(batch, num_heads, num_rows, kv_len)`` float32 (``kv_len`` = that layer's
        prefill sequence length).
    rows_index : torch.Tensor or None
        ``(num_rows,)`` the query indices of the latest record.

    Raises
    ------
    ValueError
        For a layer out of range, or a layer without ``self_attn``.
    RuntimeError
        If that attention module is already wrapped.

    Examples
    --------
    >>> with AttentionRowCapture(adapter, layer=1, rows="last") as cap:   # doctest: +SKIP
    ...     adapter.model(**inputs)
    >>> cap.probs.shape                                                   # doctest: +SKIP
    torch.Size([1, 4, 1, 586])
    """

    def __init__(
        self,
        adapter_or_layers: VisualModel | Sequence[nn.Module],
        layer: int,
        rows: RowSpec = "last",
        callback: Callable[[torch.Tensor], Any] | None = None,
        record_forward: bool = True,
        numerics: str = "fp32",
    ) -> None:
        layers = getattr(adapter_or_layers, "decoder_layers", adapter_or_layers)
        layers = list(layers)  # type: ignore[arg-type]
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
            raise ValueError(f"attention layer {layer!r} is not a decoder layer (0 <= layer < {len(layers)})")
        attn = getattr(layers[layer], "self_attn", None)
        if attn is None or not hasattr(attn, "config"):
            raise ValueError(f"decoder layer {layer} ({type(layers[layer]).__name__}) has no self_attn with a config")
        self.layer = layer
        self.rows = rows
        self.callback = callback
        self.record_forward = bool(record_forward)
        if numerics not in ("fp32", "official"):
            raise ValueError(f"AttentionRowCapture: numerics must be 'fp32' or 'official', got {numerics!r}")
        self.numerics = numerics
        self._probing = False
        self.probs: torch.Tensor | None = None
        self.rows_index: torch.Tensor | None = None
        self._attn = attn
        self._original_config: Any = None
        self._inner: Callable[..., Any] | None = None

    def __enter__(self) -> AttentionRowCapture:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attn = self._attn
        if hasattr(attn, _CAPTURE_ATTR):
            raise RuntimeError(f"the self-attention of decoder layer {self.layer} is already wrapped")
        _register_wrapper()
        original = attn.config
        impl = original._attn_implementation or "eager"
        eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        if eager is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as eager
        self._inner = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        self._original_config = original
        private = copy.copy(original)
        private._attn_implementation_internal = ROWS_ATTN_IMPLEMENTATION  # no setter: no sub-config walk
        setattr(attn, _CAPTURE_ATTR, self)
        attn.config = private
        return self

    def __exit__(self, *exc: object) -> None:
        attn = self._attn
        if self._original_config is not None:
            attn.config = self._original_config
        if hasattr(attn, _CAPTURE_ATTR):
            delattr(attn, _CAPTURE_ATTR)
        self._original_config = None
        self._inner = None

    def probe(self, hidden_states: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        """Attention rows of this layer for ``hidden_states``, without running its attention backend.

        Calls the layer's ``self_attn`` module itself (so its own q/k projections, biases and RoPE,
        1-D or Qwen2.5-VL's mRoPE, are applied exactly as in its forward) with no KV cache; the wrapper
        records the requested rows from the query/key states it receives and skips the backend. Cost:
        the module's q/k/v/o projections of ``seq_len`` tokens plus ``O(heads x rows x seq_len x
        head_dim)`` for the rows; no ``seq_len x seq_len`` attention. The official PyramidDrop code
        likewise projects q/k/v of every token and scores one query row (``pdrop_rank_drop``).

        Parameters
        ----------
        hidden_states : torch.Tensor
            ``(batch, seq_len, hidden_size)``: the layer's **normed** input (``input_layernorm`` applied).
        **attn_kwargs
            What the layer would pass to ``self_attn``: ``position_embeddings`` (cos, sin) of these
            ``seq_len`` tokens, ``attention_mask`` (4-D, 2-D or ``None``), ``position_ids``.

        Returns
        -------
        torch.Tensor
            ``(batch, num_heads, num_rows, seq_len)`` float32 probabilities (also in :attr:`probs`).

        Raises
        ------
        RuntimeError
            Outside the ``with`` block.
        """
        if self._original_config is None:
            raise RuntimeError(f"AttentionRowCapture.probe at layer {self.layer} needs the capture to be entered")
        self._probing = True
        try:
            self.clear()
            self._attn(hidden_states=hidden_states, past_key_values=None, **attn_kwargs)
        finally:
            self._probing = False
        if self.probs is None:
            raise RuntimeError(f"the probe of decoder layer {self.layer} recorded no attention rows")
        return self.probs

    def clear(self) -> None:
        """Forget the latest record."""
        self.probs = None
        self.rows_index = None

    def _record(self, query, key, attention_mask, kwargs: dict[str, Any], module: nn.Module) -> None:
        q_len, kv_len = query.shape[2], key.shape[2]
        if q_len != kv_len:  # decode step or chunked prefill: nothing to record
            return
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        rows = resolve_rows(self.rows, q_len, query.device)
        with torch.no_grad():
            probs = attention_rows(
                query, key, attention_mask, rows, scaling=float(scaling), sliding_window=kwargs.get("sliding_window"),
                numerics=self.numerics,
            )
        self.probs = probs
        self.rows_index = rows
        if self.callback is not None:
            self.callback(probs)


def _impl_of(module: nn.Module) -> str | None:
    cfg = getattr(module, "config", None)
    impl = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is not None and capture._original_config is not None:
        inner = capture._original_config._attn_implementation or "eager"
        if not capture.record_forward:
            return f"{inner} + rows {capture.rows!r} of the pre-drop input recomputed ({ROWS_ATTN_IMPLEMENTATION})"
        return f"{inner} + rows {capture.rows!r} recomputed ({ROWS_ATTN_IMPLEMENTATION})"
    return impl


def attention_backends(adapter: VisualModel, method: Any = None) -> dict[str, Any]:
    """Which attention backend every layer used, read from the modules themselves.

    Call it while the method's hooks are attached (``apet_bench.pipeline.generate`` does, right after
    ``generate``), so that a layer wrapped by :class:`AttentionRowCapture` shows as such.

    Parameters
    ----------
    adapter : VisualModel
        Gives ``decoder_layers`` and ``vision_tower``.
    method : TokenCompressor, optional
        Its :attr:`~apet_bench.methods.TokenCompressor.attention_notes` (attention it computes itself,
        e.g. VisionZip's [CLS] row) are copied under ``"method_computed"``.

    Returns
    -------
    dict
        ``{"llm_layers": [str, ...] (num_layers,), "vision_layers": [str, ...] (one per attention module
        of the vision tower, in module order), "method_computed": [dict, ...]}``. A decoder layer whose
        rows are recomputed reads e.g. ``"sdpa + rows 'last' recomputed (apet_bench_rows)"``; every other
        entry is the transformers ``_attn_implementation`` in force (``"sdpa"``, ``"eager"``,
        ``"flash_attention_2"``).
    """
    llm = [_impl_of(layer.self_attn) if hasattr(layer, "self_attn") else None for layer in adapter.decoder_layers]
    vision: list[str | None] = []
    try:
        tower = adapter.vision_tower
    except Exception:  # noqa: BLE001 - adapters without a separate tower
        tower = None
    if tower is not None:
        for name, mod in tower.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("self_attn", "attn") and hasattr(mod, "config"):
                vision.append(_impl_of(mod))
    notes = [dict(n) for n in getattr(method, "attention_notes", None) or []]
    return {"llm_layers": llm, "vision_layers": vision, "method_computed": notes}
