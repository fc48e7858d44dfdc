"""Base class and registry of the visual-token compression methods.

A method is a ``@dataclass`` and a context manager, in the manner of the presses of NVIDIA/kvpress
(``kvpress/presses/base_press.py``): ``with method(adapter): ...`` attaches whatever hooks the method
needs to the model behind a :class:`~apet_bench.core.VisualModel` and removes every one of them
on exit, so one loaded model can run several methods back to back.

A method acts at one or two stages (docs/models.md):

* stage 1, ``"vision"``: after the vision encoder and projector, before the LLM. The adapter calls
  :meth:`TokenCompressor.compress_visual` once per image and does the sequence surgery itself
  (``apet_bench.surgery``); the method only decides which visual tokens are kept, or what the new
  tokens are.
* stage 2, ``"llm"``: inside the LLM during prefill (drop / merge at decoder layer K). A method sets
  :attr:`TokenCompressor.layer` (or :meth:`TokenCompressor.llm_layers`) and implements
  :meth:`TokenCompressor.select_llm_tokens`; the shared surgery (``apet_bench.llm_surgery``) does the
  gathers, masks and KV cache (docs/models.md). Methods needing attention weights set
  ``needs_attention_weights`` and get the rows of :meth:`TokenCompressor.attention_request`
  (``apet_bench.attention``). A method may still register its own hooks in :meth:`TokenCompressor.attach`.
* ``"both"``: the two together; ``"none"``: no compression at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from apet_bench.budget import BudgetError, budget_to_tokens, validate_budget
from apet_bench.core import (
    NUMERICS,
    STAGE_ONE,
    STAGE_TWO,
    STAGES,
    AttentionRequest,
    LLMSelection,
    VisualModel,
    VisualSelection,
)
from apet_bench.methods.records import OverheadContext, TokenMap, TokenScores

__all__ = [
    "ENTRY_POINT_GROUP",
    "LLMSelection",
    "MethodImportError",
    "NUMERICS",
    "STAGES",
    "STAGE_ONE",
    "STAGE_TWO",
    "TokenCompressor",
    "UnknownMethodError",
    "VisualSelection",
    "available_methods",
    "build_method",
    "discover_methods",
    "get_method_class",
    "register_method",
    "registered_classes",
]


@dataclass
class TokenCompressor:
    """Base class of every visual-token compression method (kvpress-style dataclass + context manager).

    Subclasses set the class variables, add their hyper-parameters as dataclass fields, and implement
    :meth:`compress_visual` (stage ``"vision"``), :meth:`attach` (stage ``"llm"``), or both.

    Parameters
    ----------
    budget : int or float or None
        Visual-token budget (``apet_bench.budget``): an ``int`` is a number of visual tokens (the paper's
        convention: average visual tokens per LLM layer), a ``float`` in (0, 1] a retention ratio of the
        input's visual tokens. ``None`` only for methods that need none (``none``).
    seed : int
        Seed of any randomness in the method; a method draws from generators seeded in :meth:`reset`,
        which runs when the context is entered.
    numerics : {"official", "fp32"}
        Dtype of the method's dtype-sensitive steps (:data:`NUMERICS`): ``"official"`` (default) as the
        official code computes them in the model's dtype, ``"fp32"`` in fp32. Methods without such a
        step accept it and ignore it (``docs/numerics.md``).

    Raises
    ------
    BudgetError
        From ``__post_init__``, for an invalid budget (see :func:`apet_bench.budget.validate_budget`).
    ValueError
        From ``__post_init__``, for a seed that is not an integer or an unknown ``numerics``.

    Notes
    -----
    Lifecycle. ``with method(adapter):`` calls :meth:`reset` then :meth:`attach` and, in ``finally``,
    removes every hook registered through :meth:`register_hook` and calls :meth:`detach`. Entering again
    for the same adapter while the context is open is a no-op (so ``apet_bench.pipeline.generate``, which
    always enters the context, keeps the state of an enclosing run-level ``with``); entering for another
    adapter while open raises ``RuntimeError``.

    Examples
    --------
    >>> from apet_bench.methods import build_method
    >>> method = build_method("random", budget=64, seed=0)
    >>> with method(adapter):                       # doctest: +SKIP
    ...     for image, question in samples:
    ...         out = generate(adapter, [image], question, {"max_new_tokens": 16}, method)
    """

    #: Registry key (set by :func:`register_method`).
    name: ClassVar[str] = "base"
    #: One of :data:`STAGES`.
    stage: ClassVar[str] = "none"
    #: Whether the method reads attention weights (it must then compute only the rows it uses,
    #: docs/models.md, so the rest of the model stays on sdpa / FlashAttention).
    needs_attention_weights: ClassVar[bool] = False
    #: Stage 2: the decoder layer K at whose input visual tokens are dropped (``1 <= K < num_layers``);
    #: ``None`` = no shared stage-2 surgery (a stage-2 method then does everything in its own hooks).
    #: A method may make it a dataclass field (``layer: int = 2``) or return several layers from
    #: :meth:`llm_layers` (PDrop-style schedules).
    layer: ClassVar[int | None] = None
    #: Stage 1: the method reads the vision tower's pre-projector features
    #: (``self.visual_context.vision_features``, ``VisualModel.vision_features``); the adapter then
    #: records them in the same vision-tower pass as the visual tokens (``VisualModel.stage_one_features``).
    needs_vision_features: ClassVar[bool] = False
    #: Stage 2 only. False (default, FastV semantics): kept tokens keep their original RoPE positions.
    #: True (the official ApET / PDrop-style LLaVA code, docs/methods/apet.md): from each drop layer on, the
    #: shortened sequence is renumbered 0..L'-1 at prefill and decode positions are shifted down by the
    #: number of removed tokens. 1-D RoPE families only; see :class:`apet_bench.llm_surgery.LLMStageSurgery`.
    renumber_positions: ClassVar[bool] = False

    budget: int | float | None = None
    seed: int = 0
    numerics: str = "official"

    _adapter: Any = field(default=None, init=False, repr=False, compare=False)
    _hook_handles: list[RemovableHandle] = field(default_factory=list, init=False, repr=False, compare=False)
    #: Attention the method computes itself besides the model's backend (one entry per distinct use),
    #: filled through :meth:`note_attention`; recorded per sample in ``GenerationOutput.attention_backends``.
    attention_notes: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.budget is not None:
            self.budget = validate_budget(self.budget)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"method {self.name!r}: seed {self.seed!r} is not an integer")
        if self.numerics not in NUMERICS:
            raise ValueError(f"method {self.name!r}: numerics {self.numerics!r} is not one of {list(NUMERICS)}")

    # ------------------------------------------------------------------ lifecycle
    @contextlib.contextmanager
    def __call__(self, adapter: VisualModel) -> Iterator[TokenCompressor]:
        """Context manager that attaches the method to ``adapter`` and detaches it on exit.

        Parameters
        ----------
        adapter : VisualModel
            The loaded model the method acts on.

        Yields
        ------
        TokenCompressor
            ``self``.

        Raises
        ------
        RuntimeError
            If the method is already attached to a different adapter.
        """
        if self._adapter is not None:
            if self._adapter is adapter:  # re-entrant: keep the enclosing context's state and hooks
                yield self
                return
            raise RuntimeError(
                f"method {self.name!r} is already attached to another model; exit that context first"
            )
        self._adapter = adapter
        try:
            self.reset()
            self.attach(adapter)
            yield self
        finally:
            try:
                self.remove_hooks()
                self.detach(adapter)
            finally:
                self._adapter = None

    @contextlib.contextmanager
    def suspended(self, adapter: VisualModel) -> Iterator[None]:
        """Take the method's hooks off ``adapter`` for one sample and put them back afterwards, keeping the
        per-run state (no :meth:`reset`: random generators go on where they were). A no-op when the method
        is not attached to ``adapter``. Used for a sample that is not compressed
        (:func:`apet_bench.pipeline.within_budget`)."""
        if self._adapter is not adapter:
            yield
            return
        self.remove_hooks()
        self.detach(adapter)
        try:
            yield
        finally:
            self.attach(adapter)

    @property
    def is_active(self) -> bool:
        """Whether the method's context is open (``with method(adapter):``)."""
        return self._adapter is not None

    @property
    def visual_context(self) -> Any:
        """The adapter's :class:`~apet_bench.models.base.VisualContext` of the sample being generated
        (segments, vision features, inputs), or ``None`` outside a context / before the first sample.

        Read it in :meth:`compress_visual` (``self.visual_context.segments[image_index]``) or in stage-2
        hooks. Source: ``apet_bench.pipeline.generate`` sets it after the processor.
        """
        if self._adapter is None:
            return None
        return getattr(self._adapter, "visual_context", None)

    def note_attention(self, component: str, layer: int, rows: str, how: str) -> None:
        """Record attention probabilities the method computes itself (beside the model's backend).

        Parameters
        ----------
        component : str
            ``"vision"`` (vision encoder) or ``"llm"`` (decoder).
        layer : int
            Layer index in that component (negative = from the end, as the official code writes it).
        rows : str
            Which query rows, e.g. ``"[CLS]"``, ``"last"``, ``"text raters"``.
        how : str
            How they are computed, e.g. ``"q.k^T softmax of those rows only; layer output on sdpa"``.

        Raises
        ------
        ValueError
            For a ``component`` other than ``"vision"`` / ``"llm"``.
        """
        if component not in ("vision", "llm"):
            raise ValueError(f"attention component {component!r} is not 'vision' or 'llm'")
        note = {"component": component, "layer": int(layer), "rows": str(rows), "how": str(how)}
        if note not in self.attention_notes:
            self.attention_notes.append(note)

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Refuse a configuration this method cannot run on, **before** the model is loaded.

        Called by :func:`apet_bench.runner.prepare_run` with the composed ``model`` config group
        (``family``, ``num_layers``, ``visual_tokens``, ``max_visual_tokens``, ``tiny``, ...), so that
        e.g. a drop layer beyond the model's decoder layers, a schedule that cannot reach the budget or
        a [CLS]-based method on a tower without [CLS] fails in one line and nothing is loaded. Base:
        a stage-2 ``layer`` field must satisfy ``1 <= layer < num_layers``.

        Raises
        ------
        ValueError
            One line naming the bad value.
        """
        n = model_cfg.get("num_layers")
        layers = [] if n is None or self.stage not in ("llm", "both") else list(self.llm_layers())
        for k in layers:
            if not 1 <= int(k) < int(n):
                raise ValueError(
                    f"method {self.name!r}: layer {k} is not usable on model {model_cfg.get('name')!r} "
                    f"with {n} decoder layers (stage 2 needs 1 <= layer < {n})"
                )

    def reset(self) -> None:
        """Reset per-run state (random generators, counters); called when the context is entered."""

    def start_sample(self, key: int) -> None:
        """Called before each sample (``key``: its lmms-eval ``doc_id``): a method's CPU generator
        (``self._generator``, when it has one) is re-seeded from ``(seed, key)``, so a sample's random draws
        do not depend on which samples ran before it in this process (a resumed run draws what an
        uninterrupted one does)."""
        gen = getattr(self, "_generator", None)
        if gen is not None:
            gen.manual_seed((int(self.seed) * 1_000_003 + int(key)) % (2 ** 63))

    def attach(self, adapter: VisualModel) -> None:
        """Register the method's hooks on ``adapter`` (use :meth:`register_hook`). Base: registers none."""

    def detach(self, adapter: VisualModel) -> None:
        """Undo anything :meth:`attach` did besides hooks (hooks are removed by the base class)."""

    def register_hook(
        self,
        module: nn.Module,
        hook: Callable[..., Any],
        *,
        pre: bool = False,
        with_kwargs: bool = False,
    ) -> RemovableHandle:
        """Register a forward (pre-)hook on ``module`` and remember its handle for removal on exit.

        Parameters
        ----------
        module : torch.nn.Module
            E.g. a decoder layer ``adapter.decoder_layers[k]``.
        hook : callable
            ``hook(module, args[, kwargs][, output])`` as for ``register_forward_(pre_)hook``.
        pre : bool
            ``True`` for a forward pre-hook, ``False`` for a forward hook.
        with_kwargs : bool
            Passed to PyTorch; pre-hooks on decoder layers need it (docs/models.md).

        Returns
        -------
        torch.utils.hooks.RemovableHandle
        """
        if pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._hook_handles.append(handle)
        return handle

    def remove_hooks(self) -> None:
        """Remove every hook registered through :meth:`register_hook` (idempotent)."""
        while self._hook_handles:
            self._hook_handles.pop().remove()

    # ------------------------------------------------------------------ stage 1
    def compress_visual(self, features: torch.Tensor, *, image_index: int) -> VisualSelection:
        """Select (or build) the visual tokens of one image that enter the LLM (stage 1).

        Called by the adapter once per image, inside ``torch.inference_mode()``, with the projector
        output (docs/models.md). The base implementation keeps every token.

        Parameters
        ----------
        features : torch.Tensor
            ``(num_visual_tokens, hidden_size)``: the image's visual tokens after the projector, in the
            LLM's hidden size and the model's dtype and device (576 x 4096 for LLaVA-1.5-7B).
        image_index : int
            Index of the image within the sample (0 for single-image prompts).

        Returns
        -------
        VisualSelection
            ``features`` ``(num_kept, hidden_size)`` and, when the rows are original tokens,
            ``kept_indices`` ``(num_kept,)``.
        """
        n = int(features.shape[0])
        return VisualSelection(features, torch.arange(n, device=features.device))

    # ------------------------------------------------------------------ stage 2
    def llm_layers(self) -> tuple[int, ...]:
        """Decoder layers at whose input the shared stage-2 surgery calls :meth:`select_llm_tokens`.

        Returns
        -------
        tuple of int
            Increasing layer indices; ``()`` for methods without stage 2 (or that do it in their own
            hooks). Base: ``(self.layer,)`` for stages ``"llm"`` / ``"both"`` when :attr:`layer` is set.
        """
        if self.stage not in ("llm", "both") or self.layer is None:
            return ()
        return (int(self.layer),)

    def llm_keep_count(self, num_visual_tokens: int, *, layer_idx: int) -> int:
        """Visual tokens to keep at drop layer ``layer_idx`` out of the ``num_visual_tokens`` present there.

        Budget convention for stage 2 (docs/methods/index.md, the looser "tokens kept after the pruning
        layer" one): an ``int`` budget is the number of visual tokens kept from the drop layer on; a
        ``float`` the fraction of the visual tokens reaching that layer. Layers before the drop carry
        every token, so the per-layer average (``GenerationOutput.mean_layer_visual_tokens``, the
        paper's "equivalent average") is higher; the plan records it. Without a budget every token is
        kept (as the base :meth:`select_llm_tokens` does). Methods with another schedule override this
        (and :meth:`plan`).

        Raises
        ------
        BudgetError
            For an int budget above ``num_visual_tokens``.
        """
        if self.budget is None:
            return int(num_visual_tokens)
        return self.num_tokens_to_keep(num_visual_tokens)

    def select_llm_tokens(
        self,
        hidden_states: torch.Tensor,
        visual_positions: list[torch.Tensor],
        *,
        layer_idx: int,
        attention: torch.Tensor | None = None,
    ) -> LLMSelection:
        """Choose the visual tokens kept from decoder layer ``layer_idx`` on (stage 2, during prefill).

        Called by the shared surgery (:mod:`apet_bench.llm_surgery`) inside ``torch.inference_mode()``
        at the input of each layer of :meth:`llm_layers`, once per prefill forward (with
        ``use_cache=False`` once per generated token). The surgery then gathers hidden states, RoPE
        cos/sin, position ids and masks, and keeps masks and the per-layer KV cache consistent during
        decoding. The base implementation keeps every visual token.

        Parameters
        ----------
        hidden_states : torch.Tensor
            ``(batch_size, seq_len, hidden_size)``: the input of decoder layer ``layer_idx``.
        visual_positions : list of torch.Tensor
            Per row, ``(num_visual_i,)`` sorted long positions of the visual tokens in that sequence
            (all visual tokens still present: already-dropped ones are gone, padding excluded).
        layer_idx : int
            The drop layer K.
        attention : torch.Tensor, optional
            For methods with :attr:`needs_attention_weights`: ``(batch_size, num_heads, num_rows,
            seq_len)`` float32 attention probabilities of :meth:`attention_request` (rows of layer
            ``K - 1`` by default), over the same ``seq_len`` positions as ``hidden_states``.

        Returns
        -------
        LLMSelection
            ``keep_positions`` ``(batch_size, k)`` (the same ``k`` for every row) and optionally
            replacement ``hidden_states`` ``(batch_size, k, hidden_size)``.
        """
        n = int(visual_positions[0].numel()) if visual_positions else 0
        if any(int(v.numel()) != n for v in visual_positions):
            raise ValueError(f"method {self.name!r}: rows hold different numbers of visual tokens; use batch size 1")
        if not visual_positions:
            return LLMSelection(torch.zeros((0, 0), dtype=torch.long, device=hidden_states.device))
        return LLMSelection(torch.stack([v.to(hidden_states.device) for v in visual_positions]))

    def attention_request(self, layer_idx: int) -> Any:
        """Which attention probabilities to pass to :meth:`select_llm_tokens` at drop layer ``layer_idx``.

        Only used when :attr:`needs_attention_weights` is true. Base: the last prompt token's row at
        layer ``layer_idx - 1`` (FastV, ``pkunlp-icler/FastV`` ``modeling_llama.py``), computed for that
        layer only while the model stays on sdpa / flash (:class:`apet_bench.attention.AttentionRowCapture`).

        Returns
        -------
        apet_bench.attention.AttentionRequest
        """

        return AttentionRequest(layer=layer_idx - 1, rows="last", numerics=self.numerics)

    def plan(self, adapter: VisualModel, num_visual_tokens: int) -> list[int]:
        """Planned visual tokens at the input of every decoder layer during prefill.

        Parameters
        ----------
        adapter : VisualModel
            Gives ``num_layers``.
        num_visual_tokens : int
            Visual tokens of the sample entering the LLM (after stage 1, if any).

        Returns
        -------
        list of int
            ``(num_layers,)``; recorded next to the measured ``GenerationOutput.layer_visual_tokens``
            (they must agree). Base: ``num_visual_tokens`` up to the first layer of :meth:`llm_layers`,
            then :meth:`llm_keep_count` at each of them (e.g. ``[576, 576, 144, 144]`` for K=2, budget
            144 on a 4-layer model).
        """
        drops = set(self.llm_layers())
        counts: list[int] = []
        n = int(num_visual_tokens)
        for i in range(adapter.num_layers):
            if i in drops and n > 0:
                n = min(n, int(self.llm_keep_count(n, layer_idx=i)))
            counts.append(n)
        return counts

    # ------------------------------------------------------------------ efficiency and figures
    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """FLOPs the method computes besides the model's own forward pass, during one prefill.

        ``apet_bench.flops`` reports their sum as the method's own line (prefill TFLOPs = vision +
        LLM + this). Convention: one multiply-add = 2 FLOPs; unlike the model's count, a method's
        formula also counts its element-wise terms (norms, distances, means) and documents each.
        Every registered method defines it, next to its code; a method with nothing to count returns
        ``{}`` explicitly.

        Parameters
        ----------
        ctx : OverheadContext
            Full-size model dimensions and this prefill's token counts (per decoder layer, per vision
            layer, text tokens). The method's own hyper-parameters are its fields.

        Returns
        -------
        dict of str to int
            FLOPs per named term (e.g. ``{"attention_row_L1": ...}``); the keys are shown in the breakdown.

        Raises
        ------
        NotImplementedError
            Base class: the method has no overhead formula (``apet_bench.flops`` turns it into one line
            naming the method; a missing formula never counts as 0).
        """
        raise NotImplementedError(
            f"method {self.name!r} defines no FLOPs overhead formula (implement "
            f"{type(self).__name__}.flops_overhead)"
        )

    def token_map(self, num_visual_tokens: int, kept_indices: list[int] | None) -> TokenMap | None:
        """Which kept token every original visual token ended in, for the sample just generated.

        Called by ``apet_bench.viz`` after one ``generate`` on a single image whose visual tokens form
        one segment of ``num_visual_tokens`` (a single unit: no crops, no frames). Methods that merge
        (or that keep rows the adapter cannot report) override it and read what they recorded during
        that ``generate``.

        Parameters
        ----------
        num_visual_tokens : int
            ``N``: the image's original visual tokens.
        kept_indices : list of int or None
            ``GenerationOutput.kept_indices[0]`` of that call (indices in ``[0, N)``), or ``None``.

        Returns
        -------
        TokenMap or None
            ``None`` (base): no merges to draw; the figure shows the kept tokens only.
        """
        return None

    def token_scores(self, adapter: VisualModel, inputs: Any) -> TokenScores | None:
        """The score the method ranks the visual tokens of one image by, computed on uncompressed features.

        Called by ``apet_bench.viz`` (figure beside the attention maps) outside the method's context.

        Parameters
        ----------
        adapter : VisualModel
            The loaded model.
        inputs : BatchFeature
            Processor outputs of one prompt with one image (``adapter.prepare_inputs``).

        Returns
        -------
        TokenScores or None
            ``(N,)`` scores; ``None`` (base) when the method ranks by nothing it can show on its own.
        """
        return None

    # ------------------------------------------------------------------ helpers
    def num_tokens_to_keep(self, num_visual_tokens: int) -> int:
        """Visual tokens to keep out of ``num_visual_tokens`` under :attr:`budget`.

        Raises
        ------
        BudgetError
            If the method has no budget, or the budget does not fit ``num_visual_tokens``.
        """
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        return budget_to_tokens(self.budget, num_visual_tokens)

    def config_dict(self) -> dict[str, Any]:
        """The method's identity and hyper-parameters, for results and provenance.

        Returns
        -------
        dict
            ``{"name", "stage", "needs_attention_weights", <every init field>}``.
        """
        out: dict[str, Any] = {
            "name": self.name,
            "stage": self.stage,
            "needs_attention_weights": self.needs_attention_weights,
        }
        for f in dataclasses.fields(self):
            if f.init:
                out[f.name] = getattr(self, f.name)
        return out


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[TokenCompressor]] = {}
#: Packages whose every module is imported (once, :func:`pkgutil.iter_modules`) before the registry is
#: read, so that a method file dropped into one of them registers itself with no other edit.
PLUGIN_PACKAGES: list[str] = ["apet_bench.methods", "apet_bench.baselines"]
#: Entry-point group (``importlib.metadata``) through which another installed distribution adds methods:
#: each entry point names a module (or an object in it) that registers its classes when imported, e.g.
#: ``[project.entry-points."apet_bench.methods"] mymethod = "my_package.my_method"`` in its pyproject.toml.
ENTRY_POINT_GROUP = "apet_bench.methods"
_plugins_loaded = False


class UnknownMethodError(KeyError, ValueError):
    """An unknown method name; a ``KeyError`` and a ``ValueError`` with a one-line message."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class MethodImportError(ImportError):
    """A method module (package scan or entry point) failed to import; the message names it and the cause."""


def register_method(name: str) -> Callable[[type[TokenCompressor]], type[TokenCompressor]]:
    """Class decorator that registers a :class:`TokenCompressor` subclass under ``name``.

    Sets ``cls.name = name``. Use it above ``@dataclass``::

        @register_method("random")
        @dataclass
        class RandomCompressor(TokenCompressor): ...

    Raises
    ------
    ValueError
        If ``name`` is already registered to another class, or the class's ``stage`` is not in
        :data:`STAGES`.
    TypeError
        If the decorated object is not a ``TokenCompressor`` subclass.
    """

    def decorator(cls: type[TokenCompressor]) -> type[TokenCompressor]:
        if not (isinstance(cls, type) and issubclass(cls, TokenCompressor)):
            raise TypeError(f"register_method({name!r}) needs a TokenCompressor subclass, got {cls!r}")
        if cls.stage not in STAGES:
            raise ValueError(f"method {name!r}: stage {cls.stage!r} is not one of {list(STAGES)}")
        existing = _REGISTRY.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"method name {name!r} is already registered to {existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _import_method_module(module: str, origin: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - re-raised with the module's name
        raise MethodImportError(
            f"method module {module!r} ({origin}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc


def discover_methods() -> list[str]:
    """Import every method module: each module of :data:`PLUGIN_PACKAGES` and each entry point of the
    group :data:`ENTRY_POINT_GROUP`, so that their ``@register_method`` classes are registered.

    Returns
    -------
    list of str
        The modules imported, in order (packages first, then entry points sorted by name).

    Raises
    ------
    MethodImportError
        (an ``ImportError``) naming the module and the cause, for a module that fails to import; a
        broken method is never skipped silently.
    """
    imported: list[str] = []
    for package in PLUGIN_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(getattr(pkg, "__path__", []), prefix=f"{package}."):
            _import_method_module(info.name, f"package {package}")
            imported.append(info.name)
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - re-raised with the entry point's name
            raise MethodImportError(
                f"method module {ep.value!r} (entry point {ep.name!r} of group {ENTRY_POINT_GROUP!r}) "
                f"failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        imported.append(ep.value)
    return imported


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    discover_methods()
    _plugins_loaded = True


def registered_classes() -> list[type[TokenCompressor]]:
    """Every registered method class (after discovery), sorted by registry name."""
    _load_plugins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def available_methods() -> list[str]:
    """Sorted names of the registered methods (``apet_bench.baselines`` included)."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[TokenCompressor]:
    """The class registered under ``name``.

    Raises
    ------
    UnknownMethodError
        (a ``KeyError`` and ``ValueError``) naming ``name`` and listing the available methods.
    """
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def build_method(name: str, **params: Any) -> TokenCompressor:
    """Instantiate the method registered under ``name`` with hyper-parameters ``params``.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"none"``, ``"random"``.
    **params
        Dataclass fields of that method (``budget``, ``seed``, method-specific ones).

    Returns
    -------
    TokenCompressor

    Raises
    ------
    UnknownMethodError
        For an unknown name.
    ValueError
        For a parameter the method does not have (naming it and listing the accepted ones), or an
        invalid value (``BudgetError`` is a ``ValueError``).
    """
    cls = get_method_class(name)
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return cls(**params)
