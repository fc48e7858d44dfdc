"""Shared sequence surgery for visual-token compression (no method logic, no model family specifics).

Stage 1 (docs/models.md): the adapter takes the projector outputs, lets the method choose
the visual tokens of each image (:func:`select_visual_tokens`), then shrinks each image's placeholder
run in ``input_ids`` / ``attention_mask`` to the new count (:func:`shrink_placeholder_runs`) and calls
``generate(..., mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=new_features)})``
without ``pixel_values``. Every adapter (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Video-LLaVA) and every
method (ApET, VisionZip, ToMe, random) goes through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apet_bench.core import Compressor, ShrunkSequence, VisualSelection

__all__ = ["ShrunkSequence", "count_placeholders", "select_visual_tokens", "shrink_placeholder_runs"]


def count_placeholders(input_ids: torch.Tensor, placeholder_id: int, attention_mask: torch.Tensor | None = None) -> int:
    """Number of placeholder tokens (visual tokens) in ``input_ids``, padding excluded.

    Parameters
    ----------
    input_ids : torch.Tensor
        ``(batch_size, seq_len)`` or ``(seq_len,)``.
    placeholder_id : int
        E.g. the ``<image>`` token id.
    attention_mask : torch.Tensor, optional
        Same shape as ``input_ids``; positions with 0 are not counted.

    Returns
    -------
    int
        Visual tokens, summed over the batch.
    """
    hits = input_ids == placeholder_id
    if attention_mask is not None:
        hits = hits & attention_mask.bool()
    return int(hits.sum().item())


def select_visual_tokens(
    method: Compressor, features: Sequence[torch.Tensor]
) -> list[VisualSelection]:
    """Run a stage-1 method on each image's visual tokens and check what it returns.

    Parameters
    ----------
    method : Compressor
        A method whose context is open (``with method(adapter):``).
    features : sequence of torch.Tensor
        One ``(num_visual_tokens_i, hidden_size)`` tensor per image (projector output).

    Returns
    -------
    list of VisualSelection
        One per image; ``features`` ``(num_kept_i, hidden_size)``, ``kept_indices`` ``(num_kept_i,)``
        or ``None``.

    Raises
    ------
    ValueError
        If a method returns features of the wrong rank or hidden size, or ``kept_indices`` that are
        not 1-D, not one per kept token, out of range or repeated.
    """
    selections: list[VisualSelection] = []
    for i, feats in enumerate(features):
        if feats.ndim != 2:
            raise ValueError(f"image {i}: visual features must be (num_tokens, hidden_size), got {tuple(feats.shape)}")
        sel = method.compress_visual(feats, image_index=i)
        if not isinstance(sel, VisualSelection):
            raise ValueError(f"method {method.name!r} returned {type(sel).__name__}, expected VisualSelection")
        out = sel.features
        if out.ndim != 2 or out.shape[1] != feats.shape[1]:
            raise ValueError(
                f"method {method.name!r}, image {i}: features {tuple(out.shape)} do not match hidden size {feats.shape[1]}"
            )
        idx = sel.kept_indices
        if idx is not None:
            idx_cpu = idx.detach().to("cpu", torch.long)
            n = int(feats.shape[0])
            if idx_cpu.ndim != 1 or idx_cpu.numel() != out.shape[0]:
                raise ValueError(
                    f"method {method.name!r}, image {i}: kept_indices {tuple(idx.shape)} do not match {out.shape[0]} tokens"
                )
            if idx_cpu.numel() and (int(idx_cpu.min()) < 0 or int(idx_cpu.max()) >= n):
                raise ValueError(f"method {method.name!r}, image {i}: kept_indices out of range [0, {n})")
            if idx_cpu.unique().numel() != idx_cpu.numel():
                raise ValueError(f"method {method.name!r}, image {i}: kept_indices repeat a token")
            sel = VisualSelection(out, idx_cpu)
        selections.append(sel)
    return selections


def shrink_placeholder_runs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    placeholder_id: int,
    original_counts: Sequence[int],
    selections: Sequence[VisualSelection],
    pad_token_id: int,
) -> ShrunkSequence:
    """Resize each image's run of placeholder tokens to the number of visual tokens kept for it.

    Images are matched to placeholder runs in order (row-major over the batch): image ``i`` owns the
    next ``original_counts[i]`` placeholder tokens, which must be contiguous. Its run is replaced by
    ``selections[i].num_tokens`` placeholders at the same place; all other tokens are kept in order.
    Rows are then left-padded to a common length with ``pad_token_id`` (generation needs left
    padding). Source: docs/models.md.

    Parameters
    ----------
    input_ids : torch.Tensor
        ``(batch_size, seq_len)`` long, from the processor (left or right padded).
    attention_mask : torch.Tensor or None
        ``(batch_size, seq_len)``; ``None`` means no padding.
    placeholder_id : int
        Token id of the visual placeholder (``config.image_token_id``).
    original_counts : sequence of int
        Visual tokens per image before compression (e.g. ``[576]``).
    selections : sequence of VisualSelection
        Per image, the kept visual tokens (only ``num_tokens`` and ``kept_indices`` are read).
    pad_token_id : int
        Id written into the left padding.

    Returns
    -------
    ShrunkSequence
        ``input_ids``/``attention_mask``/``source_positions``, each ``(batch_size, new_seq_len)``.

    Raises
    ------
    ValueError
        If the placeholders in ``input_ids`` do not add up to ``original_counts`` or an image's run is
        not contiguous.
    """
    if len(original_counts) != len(selections):
        raise ValueError(f"{len(original_counts)} images but {len(selections)} selections")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = input_ids.device
    ids_cpu = input_ids.detach().to("cpu")
    mask_cpu = attention_mask.detach().to("cpu").bool()
    rows_ids: list[torch.Tensor] = []
    rows_src: list[torch.Tensor] = []
    image = 0
    for b in range(ids_cpu.shape[0]):
        cols = mask_cpu[b].nonzero().flatten()  # non-padding columns, in order
        row = ids_cpu[b, cols]
        place = (row == placeholder_id).nonzero().flatten()  # indices into `row`
        pieces_ids: list[torch.Tensor] = []
        pieces_src: list[torch.Tensor] = []
        cursor = 0  # next index into `row` not yet copied
        p = 0  # next index into `place`
        while p < place.numel():
            if image >= len(original_counts):
                raise ValueError(
                    f"input_ids hold more placeholder tokens than the {sum(original_counts)} of {len(original_counts)} image(s)"
                )
            n = int(original_counts[image])
            run = place[p : p + n]
            if run.numel() != n or int(run[-1] - run[0]) != n - 1:
                raise ValueError(f"image {image}: its {n} placeholder tokens are not one contiguous run in row {b}")
            start = int(run[0])
            pieces_ids.append(row[cursor:start])
            pieces_src.append(cols[cursor:start])
            sel = selections[image]
            m = sel.num_tokens
            pieces_ids.append(torch.full((m,), placeholder_id, dtype=row.dtype))
            if sel.kept_indices is not None:
                pieces_src.append(cols[start] + sel.kept_indices.to("cpu", torch.long))
            else:
                pieces_src.append(torch.full((m,), -1, dtype=torch.long))
            cursor = start + n
            p += n
            image += 1
        pieces_ids.append(row[cursor:])
        pieces_src.append(cols[cursor:])
        rows_ids.append(torch.cat(pieces_ids))
        rows_src.append(torch.cat(pieces_src).to(torch.long))
    if image != len(original_counts):
        raise ValueError(f"input_ids hold placeholders for {image} image(s), expected {len(original_counts)}")
    length = max(int(r.numel()) for r in rows_ids)
    batch = len(rows_ids)
    new_ids = torch.full((batch, length), pad_token_id, dtype=ids_cpu.dtype)
    new_mask = torch.zeros((batch, length), dtype=attention_mask.dtype)
    new_src = torch.full((batch, length), -1, dtype=torch.long)
    for b, (r, s) in enumerate(zip(rows_ids, rows_src)):
        n = int(r.numel())
        if n:
            new_ids[b, length - n :] = r
            new_mask[b, length - n :] = 1
            new_src[b, length - n :] = s
    return ShrunkSequence(new_ids.to(device), new_mask.to(device), new_src.to(device))
