"""The context a stage implementation runs in.

It gives a plugin what it should not build itself: the resolved device and dtype,
the stage's temporary output folder, progress bars, model loading that follows the
recipe's safety settings, and the counters that end up in report.json.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from engine.core.artifacts import ModelArtifact
from engine.core.console import make_console
from engine.core.errors import TrainingError
from engine.models import modelio, slow_paths
from engine.models.attention import resolve_attention
from engine.models.quantization import Quantization
from engine.run.runtime import Runtime


@dataclass
class StageStats:
    """Counters a stage fills in; the runner adds wall time, memory and cache state."""

    tokens: int = 0
    trainable_params: int | None = None
    forward_params: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


class ProgressTracker:
    """Handle of one progress bar; ``advance`` moves it and shows live fields."""

    def __init__(self, progress: Progress | None, task_id: Any) -> None:
        self._progress = progress
        self._task = task_id

    def advance(self, n: float = 1, **fields: Any) -> None:
        if self._progress is not None:
            info = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            self._progress.update(self._task, advance=n, info=info)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class StageContext:
    """Everything a stage implementation may use besides its inputs and params.

    Attributes a plugin reads: ``run_name`` (the recipe's ``name``); ``stage_name`` (the
    stage's ``name``: name the returned artifact after it, e.g.
    ``ModelArtifact(context.stage_name, context.output_dir)`` or
    ``LayerSelection(context.stage_name, ...)``); ``stage_kind`` (its entry in
    ``engine.api.STAGE_KINDS``); ``plugin`` (the implementation name the recipe chose);
    ``workdir`` (the run's folder); ``output_dir`` (a temporary folder for this stage's
    output, renamed into place by the runner only when ``run`` returns: write the model
    here); ``checkpoint_dir`` (a folder that survives a killed run, for resumable
    training; None outside the runner); ``runtime`` (device, dtype, 8-bit loading,
    ``trust_remote_code``, threads, as the recipe set them); ``device`` and ``dtype``
    (resolved); ``console`` (a rich console on stderr); ``stats`` (the counters the
    report shows, filled through :meth:`add_tokens`, :meth:`set_param_counts` and
    :meth:`note`).
    """

    def __init__(
        self,
        *,
        run_name: str,
        stage_name: str,
        stage_kind: str,
        plugin: str,
        workdir: Path,
        output_dir: Path,
        runtime: Runtime | None = None,
        console: Console | None = None,
        progress: Progress | None = None,
        checkpoint_dir: Path | None = None,
        use_cache: bool = False,
    ) -> None:
        self.run_name = run_name
        self.stage_name = stage_name
        self.stage_kind = stage_kind
        self.plugin = plugin
        self.workdir = Path(workdir)
        self.output_dir = Path(output_dir)
        self.runtime = runtime or Runtime()
        self.console = console or make_console()
        self.stats = StageStats()
        self._progress = progress
        #: a stable folder for resumable training checkpoints (survives a killed run,
        #: unlike ``output_dir``); None when the stage runs outside the runner
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        #: reuse saved results (the evaluation cache); off outside the runner and with --no-cache
        self.use_cache = use_cache

    # -- where things run ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return modelio.resolve_device(self.runtime.device)

    @property
    def dtype(self) -> torch.dtype:
        return modelio.resolve_dtype(self.runtime.dtype, self.device)

    # -- feedback --------------------------------------------------------------------

    @contextmanager
    def progress(self, total: float | None, description: str | None = None, *,
                 unit: str = "it") -> Iterator[ProgressTracker]:
        """A progress bar for long work: ``with ctx.progress(steps, unit="steps") as bar:
        bar.advance()``. It shows the count, the rate in ``unit``/s and a live ETA, never
        passes ``total``, and off a terminal is a plain line every tenth or 30 s
        (:mod:`engine.core.console`)."""
        if self._progress is None:
            yield ProgressTracker(None, None)
            return
        task = self._progress.add_task(description or self.stage_name, total=total, info="",
                                       unit=unit)
        try:
            yield ProgressTracker(self._progress, task)
        finally:
            self._progress.update(task, visible=False)

    def log(self, message: str) -> None:
        """``HH:MM:SS stage: message`` on the console (rich markup allowed; no source location)."""
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')} {escape(self.stage_name)}:[/] {message}",
                           highlight=False, soft_wrap=True)

    # -- report counters ---------------------------------------------------------------

    def add_tokens(self, n: int) -> None:
        """Tokens processed (trained on or scored) by this stage."""
        self.stats.tokens += int(n)

    def set_param_counts(self, *, trainable: int, forward: int) -> None:
        """Parameters updated by training, and parameters a forward pass goes through."""
        self.stats.trainable_params = int(trainable)
        self.stats.forward_params = int(forward)

    def note(self, key: str, value: Any) -> None:
        """A fact for the report (JSON-serialisable), e.g. a selector's explanation."""
        self.stats.notes[key] = value

    def slow_path(self, kind: str, subject: str, detail: str | None) -> None:
        """Record that ``subject`` takes a slower or degraded path of ``kind`` (``detail``
        says which; None: the fast path, nothing to record). It lands in report.json under
        the stage's notes ``slow_paths`` as ``"<kind>: <subject>"``, and is said in the
        stage output once per kind (see :mod:`engine.models.slow_paths`)."""
        if detail is None:
            return
        slow = self.stats.notes.setdefault("slow_paths", {})
        key = f"{kind}: {subject}"
        if key in slow:
            return
        said = any(k.startswith(f"{kind}: ") for k in slow)
        slow[key] = detail
        if not said:
            self.log(f"[yellow]slow path ({kind}, {subject}):[/] {detail}")

    # -- models ----------------------------------------------------------------------

    def load_model(self, model: ModelArtifact | Path, *, load_in_8bit: bool | None = None,
                   dtype: torch.dtype | str | None = None,
                   int8_skip_modules: Sequence[str] | None = None,
                   quantize: Quantization | None = None) -> torch.nn.Module:
        """Load a model folder with the stage's device, dtype and safety settings.

        ``load_in_8bit`` defaults to the runtime setting; trainers pass ``False``
        for the weights they train, or ``True`` with ``int8_skip_modules`` (module
        name prefixes, e.g. ``model.layers.0``) to keep the trained part in ``dtype``
        while the frozen rest is held in 8 bits. A LoRA adapter folder loads as its
        base model with the adapter merged in. ``quantize`` holds a frozen base in 4 or 8
        bits for LoRA (QLoRA, :mod:`engine.models.quantization`); not with ``runtime.fsdp``.
        """
        path = model.path if isinstance(model, ModelArtifact) else Path(model)
        if quantize is not None and self.runtime.fsdp:
            raise TrainingError(f"stage {self.stage_name!r}: {quantize.field} holds the base in "
                                f"{quantize.bits} bits, which runtime.fsdp cannot shard; set runtime.fsdp: "
                                f"false or {quantize.field}: none")
        subject = model.name if isinstance(model, ModelArtifact) else path.name
        if dtype is None and self.runtime.dtype == "auto":
            self.slow_path("dtype", self.runtime.dtype, slow_paths.auto_dtype_path(self.device))
        dtype = dtype if dtype is not None else self.dtype
        loaded = modelio.load_model(
            path,
            dtype=dtype,
            device=self.device,
            load_in_8bit=self.runtime.load_in_8bit if load_in_8bit is None else load_in_8bit,
            trust_remote_code=self.runtime.trust_remote_code,
            int8_skip_modules=int8_skip_modules,
            quantize=quantize,
            attention=resolve_attention(
                self.runtime.attention, self.device,
                modelio.resolve_dtype(dtype, self.device) if isinstance(dtype, str) else dtype),
        )
        # the attention kernel it runs, per model (report notes "attention"; eager is a slow path)
        impl = getattr(getattr(loaded, "config", None), "_attn_implementation", None)
        self.note("attention", {**self.stats.notes.get("attention", {}), subject: impl})
        self.slow_path("attention", subject, slow_paths.attention_path(loaded))
        return loaded

    def keeps(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` (from :meth:`load_model`) stays loaded after its user is done
        with it, so that freeing it must not be waited for: False here; a merge search's
        context keeps its candidate (:mod:`engine.merging.search.scoring`)."""
        return False

    def load_tokenizer(self, model: ModelArtifact | Path) -> Any:
        """The tokenizer of a model folder (a pure-Python one is said and recorded)."""
        path = model.path if isinstance(model, ModelArtifact) else Path(model)
        tokenizer = modelio.load_tokenizer(path, trust_remote_code=self.runtime.trust_remote_code)
        subject = model.name if isinstance(model, ModelArtifact) else path.name
        self.slow_path("tokenizer", subject, slow_paths.tokenizer_path(tokenizer))
        return tokenizer

    def save_model(self, model: torch.nn.Module, tokenizer: Any,
                   meta: dict[str, Any] | None = None) -> ModelArtifact:
        """Write the stage's output model folder and return its artifact."""
        modelio.save_model(model, tokenizer, self.output_dir, meta=meta)
        return ModelArtifact(name=self.stage_name, path=self.output_dir, meta=dict(meta or {}))
