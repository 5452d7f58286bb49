"""Text conditioning as it travels between encoders, caches, datasets, losses and DiTs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextEmbeds:
    """Prompt embeddings `[B, L, D]` and an optional mask `[B, L]` (True = real token, False = padding)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def to(self, device=None, dtype=None) -> "TextEmbeds":
        mask = None if self.mask is None else self.mask.to(device)
        return TextEmbeds(self.embeds.to(device=device, dtype=dtype), mask)

    def select(self, index) -> "TextEmbeds":
        """Rows `index` (an int, slice, list or tensor of indices); keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEmbeds(self.embeds[index], None if self.mask is None else self.mask[index])

    def repeat(self, n: int) -> "TextEmbeds":
        """Each row repeated n times in place (row 0 n times, then row 1 ...), for several seeds per prompt."""
        mask = None if self.mask is None else self.mask.repeat_interleave(n, 0)
        return TextEmbeds(self.embeds.repeat_interleave(n, 0), mask)

    def trimmed(self) -> "TextEmbeds":
        """Drop trailing positions that are padding in every row (they only cost attention compute)."""
        if self.mask is None:
            return self
        used = self.mask.any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        return TextEmbeds(self.embeds[:, :length], self.mask[:, :length])

    @staticmethod
    def cat(items: list["TextEmbeds"]) -> "TextEmbeds":
        """Concatenate along the batch, right-padding to the longest sequence (padding masked out)."""
        length = max(t.embeds.shape[1] for t in items)
        embeds, masks, any_mask = [], [], False
        for t in items:
            b, n, d = t.embeds.shape
            mask = t.mask if t.mask is not None else torch.ones(b, n, dtype=torch.bool, device=t.embeds.device)
            any_mask |= t.mask is not None or n != length
            if n < length:
                t_embeds = torch.cat([t.embeds, t.embeds.new_zeros(b, length - n, d)], 1)
                mask = torch.cat([mask, mask.new_zeros(b, length - n)], 1)
            else:
                t_embeds = t.embeds
            embeds.append(t_embeds)
            masks.append(mask.bool())
        return TextEmbeds(torch.cat(embeds, 0), torch.cat(masks, 0) if any_mask else None)
