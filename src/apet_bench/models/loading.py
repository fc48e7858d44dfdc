"""Loading real checkpoints: by Hugging Face id and pinned revision, or from a local path.

:func:`load_pretrained` is the one place a checkpoint is loaded (``local_files_only`` when the hub is
offline); :func:`config_processor_loader` builds a processor from the config's ``processor:`` block where
the checkpoint ships none that loads without torchvision (``docs/model-inputs.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from apet_bench.models.spec import ModelConfigError, ModelSpec, hub_offline

__all__ = ["config_processor_loader", "load_pretrained"]


def load_pretrained(
    spec: ModelSpec,
    model_class: type,
    processor_loader: Callable[[str, Mapping[str, Any], nn.Module], Any] | None = None,
) -> tuple[nn.Module, Any, str]:
    """Load a real checkpoint and its processor as ``spec`` says (HF cache, pinned revision).

    ``model_class.from_pretrained(local_path or hf_id, revision=revision (hub ids only), dtype=...,
    attn_implementation=..., device_map=<device>)`` and ``AutoProcessor.from_pretrained(same)`` (or
    ``processor_loader``), with ``local_files_only=True`` for a ``local_path`` or when the hub is
    offline (:func:`hub_offline`). The one place checkpoints are loaded: adapters whose processor
    ``AutoProcessor`` cannot build (it would need torchvision) pass a ``processor_loader``.

    Parameters
    ----------
    spec : ModelSpec
        ``tiny`` must be false.
    model_class : type
        E.g. ``transformers.LlavaForConditionalGeneration``.
    processor_loader : callable, optional
        ``processor_loader(source, common_kwargs, model) -> processor``, called after the model is
        loaded: ``source`` is the local path or hub id, ``common_kwargs`` the ``revision`` /
        ``local_files_only`` keywords to pass on to every ``from_pretrained``, ``model`` the loaded
        model (for config values). An ``OSError`` it raises is reported like the model's. Default:
        ``AutoProcessor.from_pretrained(source, **common_kwargs)``.

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode on ``spec.torch_device``.
    processor : transformers.ProcessorMixin
    weights : str
        ``"<hf_id>@<revision>"`` or ``"local:<path>"``.

    Raises
    ------
    ModelConfigError
        When the checkpoint cannot be found (e.g. offline and not in the HF cache), one line.
    """
    offline = hub_offline()
    common: dict[str, Any] = {}
    if spec.local_path is not None:
        source = spec.local_path
        weights = f"local:{source}"
        common["local_files_only"] = True
    else:
        source = str(spec.hf_id)
        weights = f"{source}@{spec.revision or 'main'}"
        if spec.revision:
            common["revision"] = spec.revision
        if offline:
            common["local_files_only"] = True
    if processor_loader is None:
        processor_loader = _auto_processor
    try:
        model = model_class.from_pretrained(
            source,
            dtype=spec.torch_dtype if spec.torch_dtype is not None else "auto",
            attn_implementation=spec.attn_implementation,
            device_map=str(spec.torch_device),
            **common,
        )
        processor = processor_loader(source, common, model)
    except OSError as e:
        where = "offline and not in the HF cache" if offline and spec.local_path is None else "not found"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelConfigError(
            f"cannot load {weights}: {where} ({first}); download it first or set local_path"
        ) from e
    return model.eval(), processor, weights


def _auto_processor(source: str, common: Mapping[str, Any], model: nn.Module) -> Any:
    """``AutoProcessor.from_pretrained(source, **common)`` (the default ``processor_loader``)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(source, **common)


def _attach_checkpoint_sentencepiece(tokenizer: Any, source: str, common: Mapping[str, Any]) -> bool:
    """Attach the checkpoint's ``tokenizer.model`` (if any) so prompts are tokenized as the official slow
    tokenizer (:func:`apet_bench.models.inputs.tokenizer_image_token`); False when there is none."""
    from apet_bench.models.inputs import attach_sentencepiece

    path = Path(source) / "tokenizer.model"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "tokenizer.model", revision=common.get("revision"),
                                        local_files_only=bool(common.get("local_files_only"))))
        except Exception:  # noqa: BLE001 - no tokenizer.model: the fast tokenizer's chunks are used
            return False
    return attach_sentencepiece(tokenizer, str(path))


def config_processor_loader(spec: ModelSpec) -> Callable[[str, Mapping[str, Any], nn.Module], Any] | None:
    """A ``processor_loader`` for :func:`load_pretrained` that builds the processor from ``spec``'s config.

    ``None`` (= the checkpoint's own processor, ``AutoProcessor``) when the config has no ``processor:``
    block, e.g. a ``save_pretrained`` directory given as a bare ``local_path`` config.

    The checkpoint's tokenizer (``AutoTokenizer.from_pretrained(source, revision / local_files_only)``)
    (with the checkpoint's ``tokenizer.model`` attached for the LLaVA family, see
    :func:`apet_bench.models.inputs.tokenizer_image_token`) and the image processor + processor
    parameters of the ``processor:`` block
    (:func:`apet_bench.models.processors.build_processor`), checked against the loaded model's config
    (:func:`apet_bench.models.processors.check_against_model`). The checkpoint's processor files are
    never read.

    Raises
    ------
    ModelConfigError
        A bad ``processor:`` block (before anything is loaded), or one that disagrees with the model.
    """
    from apet_bench.models.processors import build_processor, check_against_model, processor_options

    if spec.options.get("processor") is None:
        return None
    opts = processor_options(spec.family, spec.options)

    def loader(source: str, common: Mapping[str, Any], model: nn.Module) -> Any:
        from transformers import AutoTokenizer

        check_against_model(spec.family, opts, model.config, source)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        if spec.family in ("llava15", "llava_next", "video_llava"):
            _attach_checkpoint_sentencepiece(tokenizer, source, common)
        return build_processor(spec.family, opts, tokenizer)

    return loader
