"""Token maps: which visual tokens each method keeps, and a method's per-token scores beside attention.

Two figures for one image and one model, as the paper's Figures 4 and 2:

* **token maps** (Figure 4): per method, the image the model sees with its visual-token grid; kept
  tokens shown, dropped ones dimmed; for a two-stage method, tokens kept by the vision stage but
  dropped inside the LLM are half-dimmed; where the method reports merges, every kept token that
  absorbed dropped ones gets a colour and the tokens merged into it are tinted with it.
* **scores vs attention** (Figure 2): per-token heat maps of (a) the vision encoder's [CLS] attention at
  the layer whose output feeds the projector (CLIP's penultimate layer, ``vision_feature_layer=-2``,
  mean over heads), (b) the last query token's attention over the visual tokens at one LLM decoder
  layer (default layer 1, mean over heads, uncompressed prefill), and (c) the per-token score of the
  first requested method that defines one (:meth:`TokenCompressor.token_scores`; the paper's Figure 2
  shows ApET's approximation error).

Kept indices come from the same :attr:`GenerationOutput.kept_indices` the runner records: the model's
``generate`` runs once per method with ``max_new_tokens=1`` on the image and a short prompt. Methods
are resolved through the registry (:func:`apet_bench.methods.get_method_class`); an unregistered one is
a one-line error naming it.

Merges. After that ``generate``, the method itself reports where every original token went
(:meth:`TokenCompressor.token_map`, a :class:`~apet_bench.methods.records.TokenMap`: for each original
token the kept token its features ended in); this module knows no method by name.

Command::

    python -m apet_bench.viz image=<file> model=<name> methods=[apet,fastv,visionzip] budget=64 out=<dir> \\
        [question="Describe the image."] [seed=0] [attn_layer=1]

writes ``<out>/<image>__<model>__<budget>__token_maps.png/.svg`` (all methods),
``...__<method>.png/.svg`` (one per method), ``...__error_vs_attention.png/.svg`` and
``...__token_maps.json`` (per method: kept indices, highlighted grid cells, counts; the heat maps).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apet_bench.config import ConfigError
from apet_bench.pipeline import generate

__all__ = [
    "DEFAULT_QUESTION",
    "MethodMap",
    "TokenMapResult",
    "compute_token_maps",
    "load_model_config",
    "main",
    "render_token_maps",
    "token_maps",
]

DEFAULT_QUESTION = "Describe the image."

#: Grid-cell states in :attr:`MethodMap.grid_state` (what the figure draws).
DROPPED, STAGE1_ONLY, KEPT = 0, 1, 2


@dataclass
class MethodMap:
    """One method's kept tokens on the drawn token grid.

    Attributes
    ----------
    method : str
        Registry name.
    kept_indices : list of int or None
        ``GenerationOutput.kept_indices[0]``: indices into the image's original visual tokens, kept
        into the last decoder layer; ``None`` when the method does not report them (pooled tokens).
    visual_tokens_in, visual_tokens_llm : int
        Visual tokens before compression / entering the LLM.
    layer_visual_tokens : list of int
        Measured visual tokens at the input of each decoder layer.
    stage1_kept : list of int or None
        Two-stage methods: tokens kept by the vision stage (indices into the original tokens).
    merge_roots : numpy.ndarray or None
        ``(N,)`` int: the kept token each original token's features ended in (see the module docstring).
    grid_state : numpy.ndarray or None
        ``(h, w)`` int8 of :data:`KEPT` / :data:`STAGE1_ONLY` / :data:`DROPPED` per cell: what is drawn.
    merge_colour_index : numpy.ndarray or None
        ``(h, w)`` int: colour group of each cell (``-1`` = none).
    kept_source : str
        Where ``kept_indices`` came from: ``GenerationOutput.kept_indices`` (what the runner records)
        or, for a method that reports none there (VisionZip on LLaVA-1.5: a [CLS] row and merged rows),
        the method's own per-sample records.
    """

    method: str
    kept_indices: list[int] | None
    visual_tokens_in: int
    visual_tokens_llm: int
    layer_visual_tokens: list[int]
    stage1_kept: list[int] | None = None
    merge_roots: np.ndarray | None = None
    grid_state: np.ndarray | None = None
    merge_colour_index: np.ndarray | None = None
    kept_source: str = "GenerationOutput.kept_indices"

    @property
    def highlighted_cells(self) -> list[tuple[int, int]]:
        """``(row, col)`` of the cells drawn as kept."""
        if self.grid_state is None:
            return []
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(self.grid_state == KEPT))]


@dataclass
class TokenMapResult:
    """Everything the figures are drawn from.

    Attributes
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8: the image as the model sees it (processor output, de-normalised).
    grid : tuple of int
        ``(h, w)`` visual-token grid drawn (e.g. 24 × 24 for LLaVA-1.5).
    cell_of : dict
        Original visual-token index -> grid cell ``(row, col)`` (tokens of the drawn segment only).
    methods : list of MethodMap
    cls_attention, llm_attention, approx_error : numpy.ndarray or None
        ``(h, w)`` float heat maps (``None`` where not available: no [CLS] token, no grid).
    info : dict
        Model, weights, budget, question, layers used, notes.
    files : list of Path
        Written by :func:`render_token_maps`.
    """

    image: np.ndarray
    grid: tuple[int, int]
    cell_of: dict[int, tuple[int, int]]
    methods: list[MethodMap]
    cls_attention: np.ndarray | None = None
    llm_attention: np.ndarray | None = None
    approx_error: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------


def load_model_config(name: str) -> dict[str, Any]:
    """``configs/model/<name>.yaml`` as Hydra composes it, resolved.

    Raises
    ------
    ConfigError
        Unknown model (listing the options).
    """
    from apet_bench.config import load_group

    cfg = load_group("model", name)
    return cfg


def _method_params(name: str) -> dict[str, Any]:
    """Default ``params`` of the Hydra-composed ``configs/method/<name>.yaml`` (empty when there is none)."""
    from apet_bench.config import group_options, load_group

    if name not in group_options("method"):
        return {}
    return dict(load_group("method", name).get("params") or {})


# --------------------------------------------------------------------------------------------------
# model-side maps
# --------------------------------------------------------------------------------------------------


def _drawn_segment(adapter: Any, inputs: Any) -> tuple[Any, tuple[int, int], dict[int, tuple[int, int]]]:
    """The first gridded segment of the first visual: ``(segment, (h, w), token -> cell)``."""
    segs = adapter.visual_segments(inputs)[0]
    for seg in segs:
        if seg.grid is not None and seg.grid[0] == 1:
            _, h, w = seg.grid
            pos = seg.patch_positions.tolist()
            if seg.patches is not None:
                patch_of = dict(zip(seg.positions.tolist(), seg.patches.tolist()))
                cells = {p: divmod(int(patch_of[p]), w) for p in pos}
            else:
                cells = {p: divmod(j, w) for j, p in enumerate(pos)}
            return seg, (int(h), int(w)), cells
    raise ConfigError(f"model {adapter.name!r}: the image has no token grid to draw (segments {[s.name for s in segs]})")


def _seen_image(adapter: Any, inputs: Any, image: Any, grid: tuple[int, int]) -> np.ndarray:
    """The image as the model sees it: ``pixel_values`` de-normalised (first crop), else ``image`` resized."""
    ip = getattr(adapter.processor, "image_processor", None)
    pv = inputs.get("pixel_values") if hasattr(inputs, "get") else None
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if pv is not None and pv.dim() in (4, 5) and mean is not None and std is not None:
        x = pv[0] if pv.dim() == 4 else pv[0, 0]
        x = x.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        rescale = float(getattr(ip, "rescale_factor", None) or 1 / 255)  # pixels were x * rescale
        arr = (x / rescale).permute(1, 2, 0).numpy()
        return np.clip(np.round(arr), 0, 255).astype(np.uint8)
    h, w = grid
    side = 28  # Qwen2.5-VL: one token = 2 x 2 patches of 14 px
    return np.asarray(image.convert("RGB").resize((w * side, h * side)))


def _vision_cls_attention(adapter: Any, inputs: Any, n_cells: int) -> np.ndarray | None:
    """Mean-over-heads [CLS]-row attention over the patches at the vision layer feeding the projector."""
    tower = adapter.vision_tower
    if not any(n.endswith("class_embedding") for n, _ in tower.named_parameters()):
        return None
    layers = next((m for n, m in tower.named_modules() if n.endswith("encoder.layers")), None)
    if layers is None:
        return None
    feature_layer = getattr(adapter.model.config, "vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        feature_layer = -2
    attn = layers[feature_layer].self_attn
    got: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        b, n, _ = h.shape
        heads = int(module.num_heads)
        q = module.q_proj(h[:, :1]).view(b, 1, heads, -1).transpose(1, 2)
        k = module.k_proj(h).view(b, n, heads, -1).transpose(1, 2)
        scores = (q.float() @ k.float().transpose(-1, -2)) * float(module.scale)
        got.append(scores.softmax(-1)[0, :, 0].mean(0).cpu())  # (n,) over CLS + patches, first crop

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            adapter.encode_images(inputs)
    finally:
        handle.remove()
    if not got or got[0].numel() != n_cells + 1:
        return None
    return got[0][1:].numpy()


def _llm_attention(adapter: Any, image: Any, question: str, layer: int) -> tuple[np.ndarray, Any]:
    """Last-query attention (mean over heads) over the visual tokens at decoder ``layer``, no compression.

    Returns ``(per visual token (N,), processed inputs)``.
    """
    from apet_bench.attention import AttentionRowCapture

    with AttentionRowCapture(adapter, layer=layer, rows="last") as cap:
        generate(adapter, [image], question, {"max_new_tokens": 1})
    inputs = adapter.visual_context.inputs
    vis = adapter.visual_positions(inputs["input_ids"][:1], inputs.get("attention_mask"))[0].cpu()
    probs = cap.probs[0, :, 0].mean(0).cpu()  # (seq,)
    return probs[vis].numpy(), inputs


# --------------------------------------------------------------------------------------------------
# computing and drawing
# --------------------------------------------------------------------------------------------------


def compute_token_maps(
    adapter: Any,
    image: Any,
    methods: Sequence[str],
    budget: int | float,
    *,
    question: str = DEFAULT_QUESTION,
    seed: int = 0,
    attn_layer: int | None = None,
    method_params: dict[str, dict[str, Any]] | None = None,
) -> TokenMapResult:
    """Run every method once on ``image`` and compute the heat maps (no drawing).

    Parameters
    ----------
    adapter : ModelAdapter
    image : PIL.Image.Image
    methods : sequence of str
        Registry names (``apet_bench.methods.available_methods()``).
    budget : int or float
        Passed to every method but ``none``.
    question : str
        The short prompt (one generated token).
    seed : int
        Method seed and the seed of the FPS start of the error map.
    attn_layer : int, optional
        Decoder layer of the LLM attention map; default 1 (FastV's ``K - 1``), clamped to the model.
    method_params : dict, optional
        ``{method: {param: value}}`` over ``configs/method/<method>.yaml`` params.

    Returns
    -------
    TokenMapResult

    Raises
    ------
    apet_bench.methods.UnknownMethodError
        An unregistered method (one line naming it and the available ones), before any model call.
    ConfigError
        No drawable token grid.
    """
    from apet_bench.methods import build_method, get_method_class

    for name in methods:
        get_method_class(name)  # unknown -> UnknownMethodError, before any work
    layer = 1 if attn_layer is None else int(attn_layer)
    if not 0 <= layer < adapter.num_layers:
        raise ConfigError(f"attn_layer {layer} is not a decoder layer of {adapter.name} (0..{adapter.num_layers - 1})")

    llm_attn, inputs = _llm_attention(adapter, image, question, layer)
    seg, grid, cell_of = _drawn_segment(adapter, inputs)
    h, w = grid
    ordered = sorted(cell_of, key=lambda p: cell_of[p])
    n_cells = h * w

    def to_grid(values: np.ndarray | None, by_token: bool) -> np.ndarray | None:
        if values is None:
            return None
        out = np.full((h, w), np.nan)
        if by_token:
            for p in ordered:
                if p < values.size:
                    out[cell_of[p]] = values[p]
        else:  # already per cell in raster order
            out = np.asarray(values, dtype=np.float64).reshape(h, w)
        return out

    maps: list[MethodMap] = []
    scores = None
    for name in methods:
        cls = get_method_class(name)
        params = {**_method_params(name), **((method_params or {}).get(name) or {})}
        method = build_method(name, budget=None if cls.stage == "none" else budget, seed=seed, **params)
        out = generate(adapter, [image], question, {"max_new_tokens": 1}, method)
        kept = None if out.kept_indices is None else [int(i) for i in out.kept_indices[0]]
        if kept is None and min(out.layer_visual_tokens or [out.visual_tokens_llm]) == out.visual_tokens_in:
            kept = list(range(out.visual_tokens_in))  # nothing dropped anywhere (no compression)
        mm = MethodMap(name, kept, out.visual_tokens_in, out.visual_tokens_llm, list(out.layer_visual_tokens))
        tmap = method.token_map(out.visual_tokens_in, kept) if out.visual_tokens_in == seg.num_tokens else None
        if tmap is not None:
            mm.merge_roots = np.asarray(tmap.merge_roots, dtype=np.int64)
            mm.stage1_kept = tmap.stage1_kept
            if kept is None and tmap.kept_indices is not None:
                mm.kept_indices = kept = list(tmap.kept_indices)
                mm.kept_source = tmap.kept_source
        if scores is None:
            scores = method.token_scores(adapter, inputs)
        if kept is not None:
            state = np.full((h, w), DROPPED, dtype=np.int8)
            for p in mm.stage1_kept or []:
                if p in cell_of:
                    state[cell_of[p]] = STAGE1_ONLY
            for p in kept:
                if p in cell_of:
                    state[cell_of[p]] = KEPT
            mm.grid_state = state
            if mm.merge_roots is not None:
                colour = np.full((h, w), -1, dtype=np.int64)
                sizes: dict[int, int] = {}
                for r in mm.merge_roots:
                    if r >= 0:
                        sizes[int(r)] = sizes.get(int(r), 0) + 1
                groups = {r: g for g, r in enumerate(sorted(r for r, s in sizes.items() if s > 1))}
                for p in ordered:
                    r = int(mm.merge_roots[p]) if p < mm.merge_roots.size else -1
                    if r in groups:
                        colour[cell_of[p]] = groups[r]
                mm.merge_colour_index = colour
        maps.append(mm)

    cls_attn = _vision_cls_attention(adapter, inputs, n_cells)
    error = None
    if scores is not None and len(scores.values) == n_cells:
        error = np.asarray(scores.values, dtype=np.float64)
    vision_by_token = seg.patches is None  # Qwen: rows are tokens; CLIP: rows are patches in raster order
    return TokenMapResult(
        image=_seen_image(adapter, inputs, image, grid),
        grid=grid,
        cell_of=cell_of,
        methods=maps,
        cls_attention=to_grid(cls_attn, False) if cls_attn is not None else None,
        llm_attention=to_grid(llm_attn, True),
        approx_error=(to_grid(error, True) if vision_by_token else to_grid(error, False)) if error is not None else None,
        info={
            "model": adapter.name,
            "weights": adapter.weights,
            "random_weights": adapter.is_random_weights,
            "device": str(adapter.device),
            "attn_implementation": adapter.attn_implementation,
            "budget": budget,
            "question": question,
            "seed": seed,
            "llm_attention_layer": layer,
            "vision_attention_layer": int(getattr(adapter.model.config, "vision_feature_layer", -2))
            if isinstance(getattr(adapter.model.config, "vision_feature_layer", -2), int) else -2,
            "segment": seg.name,
            "scores_method": None if scores is None else scores.method,
            "scores_title": None if scores is None else scores.title,
        },
    )


def _overlay(ax: Any, result: TokenMapResult, mm: MethodMap) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    img = result.image
    H, W = img.shape[:2]
    h, w = result.grid
    ax.imshow(img, extent=(0, W, H, 0))
    ax.set_xticks([])
    ax.set_yticks([])
    if mm.grid_state is None:
        ax.imshow(np.zeros((1, 1, 4)) + np.array([0, 0, 0, 0.5]), extent=(0, W, H, 0))
        ax.text(W / 2, H / 2, "kept indices not reported\n(new / pooled tokens)", ha="center", va="center",
                color="white", fontsize=8)
        return
    rgba = np.zeros((h, w, 4))
    rgba[mm.grid_state == DROPPED] = (0, 0, 0, 0.72)
    rgba[mm.grid_state == STAGE1_ONLY] = (0, 0, 0, 0.38)
    cmap = plt.get_cmap("tab20")
    if mm.merge_colour_index is not None:
        merged = (mm.merge_colour_index >= 0) & (mm.grid_state != KEPT)
        for r, c in zip(*np.nonzero(merged)):
            col = np.asarray(cmap(int(mm.merge_colour_index[r, c]) % 20)[:3]) * 0.55  # darkened group colour
            rgba[r, c] = (*col, 0.72 if mm.grid_state[r, c] == DROPPED else 0.45)
    ax.imshow(rgba, extent=(0, W, H, 0), interpolation="nearest")
    cw, ch = W / w, H / h
    if len(mm.highlighted_cells) > h * w // 2:
        return  # (almost) nothing dropped: outlines would only hide the image
    rects, colours = [], []
    for r, c in mm.highlighted_cells:
        rects.append(Rectangle((c * cw, r * ch), cw, ch))
        g = mm.merge_colour_index[r, c] if mm.merge_colour_index is not None else -1
        colours.append(cmap(int(g) % 20) if g >= 0 else (1.0, 1.0, 0.2, 1.0))
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=colours, linewidth=1.0))


def _method_title(mm: MethodMap, result: TokenMapResult | None = None) -> str:
    n = len(mm.kept_indices) if mm.kept_indices is not None else mm.visual_tokens_llm
    s = f"{mm.method}: {n} of {mm.visual_tokens_in} kept"
    if result is not None and len(result.cell_of) < mm.visual_tokens_in and mm.grid_state is not None:
        s += f"\n(drawn: {result.info.get('segment')}, {len(mm.highlighted_cells)} of its {len(result.cell_of)})"
    if mm.stage1_kept is not None:
        s += f"\n({len(mm.stage1_kept)} after the vision stage)"
    if mm.merge_colour_index is not None:
        s += "\ncolours = merge groups"
    return s


def render_token_maps(result: TokenMapResult, out_dir: str | Path, stem: str) -> list[Path]:
    """Draw the figures of ``result`` into ``out_dir`` (PNG + SVG) and the JSON of what was drawn.

    Returns
    -------
    list of Path
        Every file written (also stored in ``result.files``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    note = (f"{result.info['model']} ({'random weights: pipeline check' if result.info['random_weights'] else 'real weights'}, "
            f"{result.info['device']}, {result.info['attn_implementation']}), budget {result.info['budget']}")

    def save(fig: Any, name: str) -> None:
        for ext in ("png", "svg"):
            p = out_dir / f"{stem}__{name}.{ext}"
            fig.savefig(p, dpi=130, bbox_inches="tight")
            files.append(p)
        plt.close(fig)

    n = len(result.methods)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1), 3.6), squeeze=False)
    axes[0, 0].imshow(result.image)
    axes[0, 0].set_title("input (as the model sees it)", fontsize=8)
    axes[0, 0].axis("off")
    for ax, mm in zip(axes[0, 1:], result.methods):
        _overlay(ax, result, mm)
        ax.set_title(_method_title(mm, result), fontsize=8)
    fig.suptitle(f"Kept visual tokens per method: {note}", fontsize=9)
    save(fig, "token_maps")
    for mm in result.methods:
        fig, ax = plt.subplots(figsize=(4, 4.2))
        _overlay(ax, result, mm)
        ax.set_title(_method_title(mm, result) + f"\n{note}", fontsize=7)
        save(fig, mm.method)

    panels = [
        (f"vision [CLS] attention\n(vision layer {result.info['vision_attention_layer']}: the projector's input)",
         result.cls_attention),
        (f"LLM last-query attention\n(decoder layer {result.info['llm_attention_layer']}, no compression)",
         result.llm_attention),
        (result.info.get("scores_title") or "per-token scores\n(no requested method defines them)", result.approx_error),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    axes[0].imshow(result.image)
    axes[0].set_title("input", fontsize=8)
    axes[0].axis("off")
    H, W = result.image.shape[:2]
    for ax, (title, data) in zip(axes[1:], panels):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)
        if data is None:
            ax.text(0.5, 0.5, "n/a for this model\n(no [CLS] token / grid)", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.imshow(result.image, extent=(0, W, H, 0))
        im = ax.imshow(data, extent=(0, W, H, 0), cmap="jet", alpha=0.55, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"Attention maps vs approximation error (paper Fig. 2): {note}", fontsize=9, y=1.04)
    save(fig, "error_vs_attention")

    def grid_list(a: np.ndarray | None) -> list | None:
        return None if a is None else [[None if np.isnan(v) else float(v) for v in row] for row in a]

    record = {
        **result.info,
        "grid": list(result.grid),
        "methods": {
            mm.method: {
                "kept_indices": mm.kept_indices,
                "num_kept": None if mm.kept_indices is None else len(mm.kept_indices),
                "kept_source": mm.kept_source,
                "highlighted_cells": [list(c) for c in mm.highlighted_cells],
                "stage1_kept": mm.stage1_kept,
                "merge_roots": None if mm.merge_roots is None else mm.merge_roots.tolist(),
                "visual_tokens_in": mm.visual_tokens_in,
                "visual_tokens_llm": mm.visual_tokens_llm,
                "layer_visual_tokens": mm.layer_visual_tokens,
            }
            for mm in result.methods
        },
        "cls_attention": grid_list(result.cls_attention),
        "llm_attention": grid_list(result.llm_attention),
        "approx_error": grid_list(result.approx_error),
        "figures": [str(p) for p in files],
    }
    js = out_dir / f"{stem}__token_maps.json"
    js.write_text(json.dumps(record, indent=1), encoding="utf-8")
    files.append(js)
    result.files = files
    return files


def token_maps(
    image: str | Path | Any,
    model: str | Any,
    methods: Sequence[str],
    budget: int | float,
    out: str | Path,
    **kwargs: Any,
) -> TokenMapResult:
    """Compute and draw the token maps of ``image`` (a path or a PIL image) for ``model`` (a config
    name or a loaded adapter); keyword arguments as :func:`compute_token_maps`.

    Raises
    ------
    ConfigError
        Unknown model; an image file that cannot be read.
    apet_bench.methods.UnknownMethodError
        An unregistered method.
    """
    from PIL import Image

    from apet_bench.methods import get_method_class

    for name in methods:
        get_method_class(name)
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                pil = im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"image {str(image)!r} cannot be read ({type(exc).__name__})") from None
        stem_img = Path(image).stem
    else:
        pil, stem_img = image.convert("RGB"), "image"
    if isinstance(model, str):
        from apet_bench.models import load_model

        adapter = load_model(load_model_config(model))
    else:
        adapter = model
    result = compute_token_maps(adapter, pil, methods, budget, **kwargs)
    render_token_maps(result, out, f"{stem_img}__{adapter.name}__{budget}")
    return result


def recording_methods() -> list[str]:
    """Registered methods whose class records its own merges (``token_map``) or token scores
    (``token_scores``): the default of ``methods=``."""
    from apet_bench.methods import TokenCompressor, available_methods, get_method_class

    out = []
    for name in available_methods():
        cls = get_method_class(name)
        if cls.token_map is not TokenCompressor.token_map or cls.token_scores is not TokenCompressor.token_scores:
            out.append(name)
    return out


def _command() -> Any:
    from apet_bench.cli import REQUIRED, Command, Key

    return Command(
        "python -m apet_bench.viz",
        "Token maps (which visual tokens each method keeps) and ApET's approximation error beside attention, "
        "for one image and one model.",
        (
            Key("image", REQUIRED, help="the image file", metavar="file"),
            Key("model", "tiny_llava15", help="a model config"),
            Key("methods", None, "list", help="registered method names, a list (null: every method that "
                "records its own merges or token scores)"),
            Key("budget", 64, "any", help="visual tokens kept (int) or retention ratio (float)"),
            Key("out", "results/plots/token_maps", help="output directory"),
            Key("question", DEFAULT_QUESTION, help="the prompt's question"),
            Key("seed", 0, "int", help="method randomness"),
            Key("attn_layer", None, "any", help="LLM decoder layer of the attention map (null: FastV's K - 1)"),
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (see the module docstring). Exit 2 with one line on bad input, 0 on success."""
    from apet_bench.budget import validate_budget
    from apet_bench.methods import UnknownMethodError

    def body(args: dict[str, Any]) -> int:
        if args["methods"] is None:
            args["methods"] = recording_methods()
        elif isinstance(args["methods"], str):
            args["methods"] = [args["methods"]]
        args["methods"] = [str(m) for m in args["methods"]]
        model_cfg = load_model_config(str(args["model"]))
        budget = validate_budget(args["budget"], model_cfg.get("max_visual_tokens") or model_cfg.get("visual_tokens"))
        from apet_bench.methods import get_method_class

        for name in args["methods"]:
            get_method_class(name)
        from PIL import Image

        try:
            with Image.open(args["image"]) as im:
                im.verify()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"image {str(args['image'])!r} cannot be read ({type(exc).__name__})") from None
        from apet_bench.models import load_model

        adapter = load_model(model_cfg)
        result = token_maps(
            args["image"], adapter, args["methods"], budget, args["out"],
            question=str(args["question"]), seed=args["seed"], attn_layer=args["attn_layer"],
        )
        for mm in result.methods:
            n = "n/a" if mm.kept_indices is None else len(mm.kept_indices)
            print(f"{mm.method}: {n} of {mm.visual_tokens_in} visual tokens kept (measured per layer: {mm.layer_visual_tokens})")
        print(f"model {result.info['model']} ({result.info['weights']}; {result.info['device']}, "
              f"{result.info['attn_implementation']})")
        for p in result.files:
            print(f"wrote {p}")
        return 0

    return _command().run(argv, body, (ConfigError, UnknownMethodError, ValueError))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
