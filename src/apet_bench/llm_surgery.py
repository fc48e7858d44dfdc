"""Stage-2 surgery: drop (or merge) visual tokens at decoder layer K during prefill, generic over VLM families.

docs/models.md, made a context manager that any :class:`~apet_bench.methods.Compressor`
with :meth:`~apet_bench.methods.Compressor.llm_layers` uses through
:meth:`~apet_bench.methods.Compressor.select_llm_tokens`; the method decides *which* visual tokens
stay, this module does everything else:

* a forward pre-hook on the top-level model reads ``input_ids`` / ``attention_mask`` at each prefill and
  asks the adapter for the visual positions (:meth:`VisualModel.visual_positions`, per row);
* a forward pre-hook (``with_kwargs=True``) on **every** decoder layer ``>= K`` (the model's layer loop
  passes the full-length RoPE cos/sin and mask to each layer, so hooking only layer K fails at K+1):

  - prefill (the layer's KV cache is empty): at a drop layer, the method's selection gives, per row,
    the kept columns = every non-visual column (text, padding) + the kept visual ones, in order; the
    hidden states are gathered (and the kept visual rows optionally replaced). In every layer ``>= K``
    ``position_embeddings=(cos, sin)``, ``position_ids`` and the mask are gathered to the same columns
    of the original sequence: a 4-D mask (eager; sdpa with padding) on both its query and key dims, a
    2-D padding mask (flash_attention_2) on its only dim, ``None`` (sdpa / flash without padding) stays
    ``None`` (causal over the kept tokens, which are in order).
  - decode: generate's mask covers ``full_len + t`` columns (sized from layer 0's cache, which K >= 1
    keeps full), while this layer's cache holds ``kept + t``: the hook selects the columns
    ``kept ∪ [full_len, full_len + t)``. Position ids and RoPE of the new token come from generate,
    which continues the original (full-length) positions, so kept tokens keep their original RoPE
    positions (FastV semantics).

The per-layer KV cache lengths then differ (``[591, 591, 159, 159]``), which only ``DynamicCache``
allows (a static cache sizes every layer alike: a clear error is raised). Several drop layers (PDrop-
style schedules) compose: each selects among the visual tokens still present. Attention rows come
from layer ``K - 1``'s prefill (FastV) or, for a ``pre_drop`` request, from layer K's own norm, q/k
projections and RoPE applied to its input before the drop (PyramidDrop; ``AttentionRowCapture.probe``). Rows of a batch must
keep the same number of tokens (fixed-count methods on a left-padded batch); use batch size 1 for
adaptive counts. ``K = 0`` is not supported (layer 0's cache length sizes the decode masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from apet_bench.attention import AttentionRowCapture
from apet_bench.core import Compressor, LLMSelection, VisualModel

__all__ = ["LLMStageSurgery", "build_keep_index", "gather_seq"]


def gather_seq(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather ``t`` along ``dim`` with a per-row index (batch on dim 0, broadcast from 1 if needed).

    Parameters
    ----------
    t : torch.Tensor
        ``(batch | 1, ...)`` with the sequence on ``dim``.
    index : torch.Tensor
        ``(batch, new_len)`` long column indices.
    dim : int
        Sequence dimension of ``t`` (``>= 1``; negative allowed).

    Returns
    -------
    torch.Tensor
        ``t`` with ``dim`` of size ``new_len`` and dim 0 of size ``batch``.
    """
    b, n = index.shape
    dim = dim % t.ndim
    if t.shape[0] != b:
        t = t.expand(b, *t.shape[1:])
    view = [b] + [1] * (t.ndim - 1)
    view[dim] = n
    shape = list(t.shape)
    shape[dim] = n
    return t.gather(dim, index.to(t.device).view(view).expand(shape))


def build_keep_index(
    selection: LLMSelection, visual_positions: Sequence[torch.Tensor], seq_len: int
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Columns kept at a drop layer: every non-visual column plus the selected visual ones, in order.

    Parameters
    ----------
    selection : LLMSelection
        ``keep_positions`` ``(batch, k)``.
    visual_positions : sequence of torch.Tensor
        Per row, ``(num_visual_i,)`` positions of the visual tokens present.
    seq_len : int
        Length of the drop layer's input sequence.

    Returns
    -------
    index : torch.Tensor
        ``(batch, new_len)`` long, increasing per row: the kept columns.
    new_visual_positions : list of torch.Tensor
        Per row, ``(k,)`` positions of the kept visual tokens in the new sequence, increasing.
    replaced_at : torch.Tensor
        ``(batch, k)`` long: for each ``keep_positions[b, j]``, its column in the new sequence.

    Raises
    ------
    ValueError
        For a malformed selection (shape, dtype, a position that is not a visual token, a repeat) or
        rows keeping different numbers of tokens.
    """
    kp = selection.keep_positions
    b = len(visual_positions)
    if not isinstance(kp, torch.Tensor) or kp.ndim != 2 or kp.shape[0] != b:
        shape = tuple(kp.shape) if isinstance(kp, torch.Tensor) else type(kp).__name__
        raise ValueError(f"keep_positions must be (batch={b}, k), got {shape}")
    if kp.dtype.is_floating_point or kp.dtype == torch.bool:
        raise ValueError(f"keep_positions must be integer positions, got dtype {kp.dtype}")
    device = visual_positions[0].device if b else kp.device
    kp = kp.to(device, torch.long)
    keep = torch.ones((b, seq_len), dtype=torch.bool, device=device)
    for row in range(b):
        vis = visual_positions[row]
        is_vis = torch.zeros(seq_len, dtype=torch.bool, device=device)
        is_vis[vis] = True
        k_row = kp[row]
        if k_row.numel() and (int(k_row.min()) < 0 or int(k_row.max()) >= seq_len or not bool(is_vis[k_row].all())):
            raise ValueError(f"row {row}: keep_positions hold a position that is not a visual token")
        if k_row.unique().numel() != k_row.numel():
            raise ValueError(f"row {row}: keep_positions repeat a position")
        keep[row, vis] = False
        keep[row, k_row] = True
    counts = keep.sum(dim=1)
    if b and bool((counts != counts[0]).any()):
        raise ValueError(
            f"stage 2 keeps {counts.tolist()} tokens per row; rows of a batch must keep the same count "
            "(use batch size 1 for methods with an adaptive count)"
        )
    index = keep.nonzero()[:, 1].view(b, -1)
    replaced_at = torch.stack([torch.searchsorted(index[r], kp[r]) for r in range(b)]) if b else kp
    new_vis = [torch.searchsorted(index[r], kp[r].sort().values) for r in range(b)]
    return index, new_vis, replaced_at


def _check_cache(cache: Any) -> None:
    if cache is None:
        return
    from transformers.cache_utils import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"stage-2 token dropping needs a DynamicCache (per-layer KV lengths differ), got {type(cache).__name__}; "
            "do not set cache_implementation='static' or pass another cache"
        )


def _cache_len(cache: Any, layer_idx: int) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


class LLMStageSurgery:
    """Context manager running a method's stage 2 on ``adapter.model`` (hooks removed on exit).

    Parameters
    ----------
    adapter : VisualModel
        Gives ``model``, ``decoder_layers`` and ``visual_positions(input_ids, attention_mask)``.
    method : Compressor
        Its :meth:`~Compressor.llm_layers` (unless ``layers`` is given),
        :meth:`~Compressor.select_llm_tokens` and, with ``needs_attention_weights``,
        :meth:`~Compressor.attention_request` are used.
    layers : sequence of int, optional
        Drop layers overriding ``method.llm_layers()``.

    Attributes
    ----------
    layers : tuple of int
        The drop layers, increasing.
    kept_positions : dict of int to torch.Tensor
        After a prefill: per drop layer, ``(batch, k)`` positions in the **original** (layer-0)
        sequence of the visual tokens kept from that layer on.
    layer_lengths : dict of int to int
        After a prefill: sequence length at the input of every layer ``>= first drop layer``.
    num_prefills : int
        Prefill forwards seen (1 per cached generate; 1 per token with ``use_cache=False``).

    Raises
    ------
    ValueError
        On enter: no drop layer, a drop layer outside ``1 <= K < num_layers``, an attention request
        at or above its drop layer (or across another drop layer), a ``pre_drop`` request
        (:class:`~apet_bench.attention.AttentionRequest`, PyramidDrop) naming another layer than its drop layer. During generation: a static cache,
        a forward without ``input_ids``, a malformed selection, rows keeping different counts.

    Examples
    --------
    >>> method = build_method("random", budget=144, stage="llm", layer=2)        # doctest: +SKIP
    >>> with torch.inference_mode(), method(adapter), LLMStageSurgery(adapter, method) as s:  # doctest: +SKIP
    ...     out = adapter.model.generate(**inputs, max_new_tokens=8)
    >>> [layer.get_seq_length() for layer in out.past_key_values.layers]      # doctest: +SKIP
    [593, 593, 161, 161]
    """

    def __init__(self, adapter: VisualModel, method: Compressor, layers: Sequence[int] | None = None) -> None:
        self.adapter = adapter
        self.method = method
        drops = tuple(int(k) for k in (method.llm_layers() if layers is None else layers))
        num_layers = len(adapter.decoder_layers)
        if not drops:
            raise ValueError(f"method {method.name!r} has no stage-2 layer (set `layer`)")
        if list(drops) != sorted(set(drops)):
            raise ValueError(f"stage-2 layers {list(drops)} must be increasing and distinct")
        for k in drops:
            if not 1 <= k < num_layers:
                raise ValueError(
                    f"stage-2 layer {k} is not usable: the model has {num_layers} decoder layers and stage 2 needs "
                    f"1 <= layer < {num_layers}"
                )
        self.layers = drops
        self._requests: dict[int, Any] = {}
        if method.needs_attention_weights:
            for k in drops:
                req = method.attention_request(k)
                before = [j for j in drops if j < k]
                lowest = before[-1] if before else 0
                if getattr(req, "pre_drop", False):
                    if req.layer != k:
                        raise ValueError(
                            f"attention request at layer {req.layer} for drop layer {k}: a pre_drop request "
                            f"reads the drop layer itself (layer {k})"
                        )
                elif not lowest <= req.layer < k:
                    raise ValueError(
                        f"attention request at layer {req.layer} for drop layer {k}: it must be in [{lowest}, {k}) "
                        "(at or after the previous drop, before this one)"
                    )
                self._requests[k] = req
        self._renumber = bool(getattr(method, "renumber_positions", False))
        self._rotary = None
        if self._renumber:
            if getattr(adapter, "position_encoding", "rope-1d") != "rope-1d":
                raise ValueError(
                    f"method {method.name!r}: renumber_positions needs 1-D RoPE, model {adapter.name!r} uses "
                    f"{adapter.position_encoding}"
                )
            lm = getattr(getattr(adapter.model, "model", None), "language_model", None)
            self._rotary = getattr(lm, "rotary_emb", None)
            if self._rotary is None:
                raise ValueError(f"method {method.name!r}: renumber_positions cannot find the LLM's rotary embedding")
        self._handles: list[Any] = []
        self._captures: dict[int, AttentionRowCapture] = {}
        self.kept_positions: dict[int, torch.Tensor] = {}
        self.layer_lengths: dict[int, int] = {}
        self.num_prefills = 0
        self._reset_state()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LLMStageSurgery:
        try:

            modes: dict[int, bool] = {}
            for req in self._requests.values():
                pre = bool(getattr(req, "pre_drop", False))
                if modes.setdefault(req.layer, pre) != pre:
                    raise ValueError(f"layer {req.layer} is requested both as a pre-drop probe and as a recorded layer")
                if req.layer not in self._captures:
                    cap = AttentionRowCapture(self.adapter, req.layer, req.rows, record_forward=not pre,
                                              numerics=getattr(req, "numerics", "fp32"))
                    cap.__enter__()
                    self._captures[req.layer] = cap
            self._handles.append(self.adapter.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
            layers = self.adapter.decoder_layers
            for i in range(self.layers[0], len(layers)):
                self._handles.append(layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._captures:
            _, cap = self._captures.popitem()
            cap.__exit__()
        self._reset_state()

    def _reset_state(self) -> None:
        self._full_len: int | None = None
        self._visual: list[torch.Tensor] | None = None
        self._cur: torch.Tensor | None = None  # (B, L_cur) columns of the original sequence
        self._layer_index: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ hooks
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None and _cache_len(cache, 0) > 0:
            return  # decode step: keep the prefill's state
        _check_cache(cache)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("stage-2 surgery needs input_ids at prefill to find the visual tokens (got inputs_embeds only)")
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        self._reset_state()
        self._full_len = int(input_ids.shape[1])
        self._visual = [p.to(input_ids.device, torch.long) for p in self.adapter.visual_positions(input_ids, mask)]
        self.kept_positions = {}
        self.layer_lengths = {}
        self.num_prefills += 1
        for cap in self._captures.values():
            cap.clear()

    def _layer_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            cache = kwargs.get("past_key_values")
            if _cache_len(cache, i) == 0:
                return self._prefill(i, args, kwargs)
            return self._decode(i, args, kwargs, cache)

        return hook

    def _prefill(self, i: int, args: tuple, kwargs: dict):
        if self._full_len is None or self._visual is None:
            raise RuntimeError(
                f"decoder layer {i} ran a prefill without the top-level model's forward; call adapter.model(...)"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        if i in self.layers and any(int(v.numel()) for v in self._visual):
            hidden = self._drop(i, hidden, kwargs)
        if self._cur is None:  # nothing dropped (no visual tokens)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        idx = self._cur
        self._layer_index[i] = idx
        self.layer_lengths[i] = int(idx.shape[1])
        new = self._gathered_kwargs(kwargs, idx)
        if args:
            return (hidden, *args[1:]), new
        new["hidden_states"] = hidden
        return args, new

    def _gathered_kwargs(self, kwargs: dict, idx: torch.Tensor) -> dict:
        """The layer kwargs (RoPE cos/sin, position ids, mask) of the original sequence gathered to columns ``idx``."""
        full = int(self._full_len or 0)
        new = dict(kwargs)
        # Positions: gathered at the kept columns (original positions), or, with renumbering, the
        # first L' columns' positions (0..L'-1 for an unpadded row: the compacted numbering).
        pos_idx = idx
        if self._renumber:
            if idx.shape[0] != 1:
                raise ValueError("renumber_positions supports batch size 1 (as the official code)")
            pos_idx = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            new["position_embeddings"] = tuple(_gather_positional(t, pos_idx, full) for t in pe)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            new["position_ids"] = _gather_positional(pos, pos_idx, full)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            new["attention_mask"] = _gather_mask_prefill(mask, idx, full)
        return new

    def _probe(self, i: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Rows of drop layer ``i``'s own attention on its pre-drop input (a ``pre_drop`` request).

        The layer's ``input_layernorm`` is applied to ``hidden`` and its ``self_attn`` probed with the
        RoPE / positions / mask of the columns present before this drop (previous drops applied).
        """
        layer = self.adapter.decoder_layers[i]
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            raise ValueError(f"decoder layer {i} ({type(layer).__name__}) has no input_layernorm to probe its attention")
        cur = self._gathered_kwargs(kwargs, self._cur) if self._cur is not None else dict(kwargs)
        attn_kwargs = {k: cur[k] for k in ("position_embeddings", "attention_mask", "position_ids") if k in cur}
        return self._captures[i].probe(norm(hidden), **attn_kwargs)

    def _drop(self, i: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        assert self._visual is not None
        seq_len = int(hidden.shape[1])
        attention = None
        if i in self._requests:
            cap = self._captures[self._requests[i].layer]
            if getattr(self._requests[i], "pre_drop", False):
                self._probe(i, hidden, kwargs)
            if cap.probs is None or cap.probs.shape[-1] != seq_len:
                raise RuntimeError(f"attention rows for drop layer {i} were not recorded in this prefill")
            attention = cap.probs
        sel = self.method.select_llm_tokens(hidden, list(self._visual), layer_idx=i, attention=attention)
        if not isinstance(sel, LLMSelection):
            raise ValueError(f"method {self.method.name!r} returned {type(sel).__name__}, expected LLMSelection")
        index, new_vis, replaced_at = build_keep_index(sel, self._visual, seq_len)
        index = index.to(hidden.device)
        out = gather_seq(hidden, index, 1)
        if sel.hidden_states is not None:
            rep = sel.hidden_states
            if rep.shape != (*replaced_at.shape, hidden.shape[-1]):
                raise ValueError(
                    f"method {self.method.name!r}: replacement hidden states {tuple(rep.shape)} do not match "
                    f"{(*replaced_at.shape, hidden.shape[-1])}"
                )
            at = replaced_at.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            out = out.scatter(1, at, rep.to(out.dtype))
        self._cur = index if self._cur is None else self._cur.gather(1, index.to(self._cur.device))
        self._visual = new_vis
        self.kept_positions[i] = torch.stack([self._cur[r, v] for r, v in enumerate(new_vis)])
        return out

    def _decode(self, i: int, args: tuple, kwargs: dict, cache: Any):
        idx = self._layer_index.get(i)
        if idx is None:
            return None  # no drop happened at prefill (no visual tokens)
        new = dict(kwargs)
        if self._renumber:
            # Decode positions follow the compacted cache: shift by the tokens removed before this layer.
            removed = int(self._full_len or 0) - int(idx.shape[1])
            pos = kwargs.get("position_ids")
            hidden_states = args[0] if args else kwargs["hidden_states"]
            if not isinstance(pos, torch.Tensor):
                raise ValueError(f"renumber_positions: decoder layer {i} received no position_ids to shift")
            shifted = pos - removed
            new["position_ids"] = shifted
            new["position_embeddings"] = self._rotary(hidden_states, position_ids=shifted)
        mask = kwargs.get("attention_mask")
        if mask is None:
            return (args, new) if self._renumber else None
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 4):
            raise ValueError(f"stage-2 surgery: unsupported attention mask {type(mask).__name__} at layer {i}")
        full = int(self._full_len or 0)
        extra = int(mask.shape[-1]) - full
        hidden = args[0] if args else kwargs["hidden_states"]
        expected = _cache_len(cache, i) + int(hidden.shape[1])
        if extra < 0 or idx.shape[1] + extra != expected:
            raise RuntimeError(
                f"stage-2 surgery: layer {i} mask has {mask.shape[-1]} columns for a prefill of {full}, "
                f"but the layer's cache will hold {expected} tokens (only DynamicCache with one prefill is supported)"
            )
        tail = torch.arange(full, full + extra, device=idx.device).expand(idx.shape[0], extra)
        cols = torch.cat([idx, tail], dim=1)
        new["attention_mask"] = gather_seq(mask, cols, -1)
        return args, new


def _gather_positional(t: torch.Tensor, idx: torch.Tensor, full_len: int) -> torch.Tensor:
    """Gather RoPE cos/sin ``(B|1, L, D)`` / ``(3, B|1, L, D)`` or position ids ``(B|1, L)`` / ``(3|4, B|1, L)``."""
    if t.ndim == 2 and t.shape[1] == full_len:
        return gather_seq(t, idx, 1)
    if t.ndim == 3 and t.shape[1] == full_len:
        return gather_seq(t, idx, 1)
    if t.ndim == 3 and t.shape[2] == full_len:  # (n, B, L) multi-row position ids
        return torch.stack([gather_seq(x, idx, 1) for x in t])
    if t.ndim == 4 and t.shape[2] == full_len:  # (n, B, L, D) unfolded multi-axis RoPE
        return torch.stack([gather_seq(x, idx, 1) for x in t])
    raise ValueError(f"stage-2 surgery: cannot find the sequence dim of a {tuple(t.shape)} tensor (prefill {full_len})")


def _gather_mask_prefill(mask: Any, idx: torch.Tensor, full_len: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"stage-2 surgery supports eager, sdpa and flash_attention_2 masks, got {type(mask).__name__}"
        )
    if mask.ndim == 2:  # flash_attention_2: (B, L) padding mask
        return gather_seq(mask, idx, 1)
    if mask.ndim == 4:  # (B|1, 1|H, L, L): rows and columns
        if mask.shape[-1] != full_len or mask.shape[-2] != full_len:
            raise ValueError(f"stage-2 surgery: prefill mask {tuple(mask.shape)} is not {full_len} x {full_len}")
        return gather_seq(gather_seq(mask, idx, 2), idx, 3)
    raise ValueError(f"stage-2 surgery: unsupported attention mask shape {tuple(mask.shape)}")
