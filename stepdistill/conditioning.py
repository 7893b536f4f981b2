"""What a backbone is conditioned on, and the null condition used for classifier-free guidance."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Cond:
    """Conditioning for one batch. Every tensor field has the batch as its first dimension.

    - ``class_labels``: int64 labels; the null class (for CFG) is ``num_classes``, as DiT and the digits
      teacher use.
    - ``encoder_hidden_states`` / ``encoder_attention_mask``: text embeddings (SD, SDXL, PixArt, SD3, Flux).
    - ``pooled``: pooled text embedding (SDXL ``text_embeds``, SD3/Flux ``pooled_projections``).
    - ``time_ids``: SDXL micro-conditioning ``add_time_ids``.
    - ``guidance``: the guidance scale the student is asked for, in the standard CFG form (s=1 is no
      guidance), for guidance-embedded students (LCM ``time_cond_proj_dim``, Flux ``guidance``).
    - ``image``: a source image concatenated on channels (image-conditioned teachers).
    - ``extra``: backbone-specific keyword tensors (e.g. PixArt's ``resolution``/``aspect_ratio``).
    """

    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    image: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def _tensors(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                yield f.name, value

    def map(self, fn) -> "Cond":
        """Apply ``fn`` to every tensor (including ``extra``)."""
        changes = {name: fn(value) for name, value in self._tensors()}
        changes["extra"] = {k: fn(v) for k, v in self.extra.items()}
        return replace(self, **changes)

    def to(self, *args, **kwargs) -> "Cond":
        return self.map(lambda x: x.to(*args, **kwargs))

    def __getitem__(self, index) -> "Cond":
        return self.map(lambda x: x[index])

    def repeat(self, n: int) -> "Cond":
        return self.map(lambda x: x.repeat_interleave(n, dim=0))

    @property
    def batch_size(self) -> int | None:
        for _, value in self._tensors():
            return value.shape[0]
        for value in self.extra.values():
            return value.shape[0]
        return None

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        first = conds[0]
        changes = {}
        for f in fields(first):
            values = [getattr(c, f.name) for c in conds]
            if f.name == "extra":
                changes["extra"] = {k: torch.cat([c.extra[k] for c in conds]) for k in first.extra}
            elif all(v is None for v in values):
                changes[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"cannot concatenate conditions where only some have {f.name!r}")
            else:
                changes[f.name] = torch.cat(values)
        return Cond(**changes)

    def null_like(self, null: "Cond | None" = None, *, null_class: int | None = None) -> "Cond":
        """The unconditional counterpart of this batch, for CFG.

        Class labels become ``null_class``; text fields come from ``null`` (the encoded empty prompt, batch
        of one, broadcast) or, without it, are zeroed. ``guidance``, ``time_ids``, ``image`` and ``extra`` are
        kept: they describe the sample, not the prompt.
        """
        out = replace(self)
        n = self.batch_size or 1
        if self.class_labels is not None:
            if null_class is None:
                raise ValueError("null conditioning for class labels needs the null class id (num_classes); "
                                 "train the teacher with label dropout so that it has one")
            out.class_labels = torch.full_like(self.class_labels, null_class)
        for name in ("encoder_hidden_states", "encoder_attention_mask", "pooled"):
            value = getattr(self, name)
            if value is None:
                continue
            template = getattr(null, name, None) if null is not None else None
            if template is None:
                template = torch.zeros_like(value[:1]) if name != "encoder_attention_mask" else torch.ones_like(value[:1])
            setattr(out, name, template.to(value.device, value.dtype).expand(n, *template.shape[1:]).clone())
        return out

    def dropped(self, drop: torch.Tensor, null: "Cond | None" = None, *, null_class: int | None = None) -> "Cond":
        """This batch with the rows where ``drop`` (bool, ``(B,)``) is True made unconditional, as
        :meth:`null_like` makes them (class labels to ``null_class``, prompts to the encoded empty prompt ``null``):
        condition dropout for classifier-free guidance (Ho & Salimans 2022). Without labels or prompts, as is."""
        if self.class_labels is None and self.encoder_hidden_states is None and self.pooled is None:
            return self
        empty = self.null_like(null, null_class=null_class)
        out = replace(self)
        for name in ("class_labels", "encoder_hidden_states", "encoder_attention_mask", "pooled"):
            value = getattr(self, name)
            if value is not None:
                mask = drop.to(value.device).view(-1, *([1] * (value.dim() - 1)))
                setattr(out, name, torch.where(mask, getattr(empty, name), value))
        return out

    @classmethod
    def from_batch(cls, batch: dict) -> "Cond":
        """Read the conditioning fields a data set yields (see ``stepdistill.data``)."""
        # ``image`` in a batch is the sample itself (the data convention), never a conditioning image: a
        # source image for image-conditioned teachers arrives as ``source_image``.
        known = {f.name for f in fields(cls)} - {"extra", "image"}
        kwargs = {k: v for k, v in batch.items() if k in known}
        if "class_label" in batch:
            kwargs["class_labels"] = batch["class_label"]
        if "source_image" in batch:
            kwargs["image"] = batch["source_image"]
        return cls(**kwargs)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of this condition as a flat dict (``extra`` keys as ``extra.<name>``), e.g. to save."""
        out = dict(self._tensors())
        out.update({f"extra.{k}": v for k, v in self.extra.items()})
        return out

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> "Cond":
        """The inverse of :meth:`as_dict`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in tensors.items() if k in known}
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        unknown = set(tensors) - set(kwargs) - {f"extra.{k}" for k in extra}
        if unknown:
            raise ValueError(f"unknown conditioning fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**kwargs, extra=extra)
