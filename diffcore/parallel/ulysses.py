"""Ulysses sequence parallelism: in the token-wise layers each rank holds a contiguous shard of the
token sequence; inside attention it holds all tokens of ``heads / degree`` heads. The two all-to-alls
around the attention call (plus one gather of the model output) are the only communication.

Models opt in through ``sequence_shard(n)`` at their entry (see the FLUX, Qwen-Image and Wan
transformers): it returns None unless a sequence-parallel pipeline is running in this context, so the
single-process path is unchanged. A model then

* ``shard.split``s every per-token tensor of the sharded stream (hidden states, RoPE rows,
  per-token modulation indices, condition-token masks) the same way,
* passes ``shard=`` to ``diffcore.models.attention.attention`` for self/joint attention (tokens that
  every rank holds whole, e.g. the text of joint attention, come first: a *prefix*), and leaves
  cross-attention to a replicated context local (no ``shard``),
* ``shard.gather``s its output.

Lengths that do not divide by the degree are padded at the end of the global sequence; padded keys
are masked out inside attention and padded rows are dropped by ``gather``.
"""
from __future__ import annotations

from typing import Callable, Optional

import attrs
import torch

from .groups import ParallelGroups, current


@attrs.frozen
class SeqShard:
    """One rank's slice of a sequence of ``valid`` tokens split over ``degree`` ranks (``local`` each)."""

    groups: ParallelGroups
    valid: int
    local: int

    @property
    def degree(self) -> int:
        return self.groups.sp_degree

    @property
    def rank(self) -> int:
        return self.groups.sp_rank

    @property
    def padded(self) -> int:
        return self.local * self.degree

    @property
    def local_valid(self) -> int:
        """Real (non-padding) rows of this rank's shard; padding sits at the end of the global sequence."""
        return max(0, min(self.local, self.valid - self.rank * self.local))

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's rows of ``x`` along ``dim`` (``x`` holds all ``valid`` rows; padding is zeros)."""
        if x.shape[dim] != self.valid:
            raise ValueError(f"expected {self.valid} rows along dim {dim}, got {tuple(x.shape)}")
        start = self.rank * self.local
        part = x.narrow(dim, start, max(0, min(self.local, self.valid - start)))
        if part.shape[dim] < self.local:
            pad = list(x.shape)
            pad[dim] = self.local - part.shape[dim]
            part = torch.cat([part, x.new_zeros(pad)], dim=dim)
        return part.contiguous()

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All ranks' shards along ``dim`` in sequence order, padding dropped: the full ``valid`` rows."""
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        dist.all_gather(parts, x, group=self.groups.sp_group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.valid)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, group=self.groups.sp_group)
        return t

    def rel_l1(self, now: torch.Tensor, before: torch.Tensor) -> float:
        """The step caches' relative L1 change over the real tokens of all shards (rows on dim 1), so
        every rank takes the same skip decision, the one a single process would take."""
        n = self.local_valid
        now, before = now.narrow(1, 0, n), before.narrow(1, 0, n)
        sums = torch.stack([(now - before).abs().sum(), before.abs().sum()]).double()
        sums = self.all_reduce(sums)
        count = float(now.shape[0] * self.valid * now[0, 0].numel())
        return float((sums[0] / count) / (sums[1] / count).clamp_min(1e-12))


def sequence_shard(num_tokens: int) -> Optional[SeqShard]:
    """How to split a sequence of ``num_tokens`` in the running pipeline's sequence-parallel group;
    None when no sequence parallelism is active (the model then runs as in one process)."""
    groups = current()
    if groups is None or groups.sp_degree == 1:
        return None
    local = -(-num_tokens // groups.sp_degree)
    return SeqShard(groups=groups, valid=num_tokens, local=local)


def _all_to_all(send: torch.Tensor, shard: SeqShard) -> torch.Tensor:
    import torch.distributed as dist

    shard.groups.stats["all_to_all"] += 1
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=shard.groups.sp_group)
    return recv


def _to_head_shards(t: torch.Tensor, shard: SeqShard) -> tuple[torch.Tensor, int]:
    """``(B, prefix + local, H, D)`` sequence shard -> ``(B, prefix + padded, H / degree, D)`` head shard.

    The prefix (tokens every rank holds) is sliced to this rank's heads without communication.
    """
    p, r, n = shard.degree, shard.rank, shard.local
    b, s, h, d = t.shape
    prefix, hp = s - n, h // p
    body = t[:, prefix:].reshape(b, n, p, hp, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j -> rank j
    body = _all_to_all(body, shard).permute(1, 0, 2, 3, 4).reshape(b, p * n, hp, d)  # chunk i <- rank i
    if prefix == 0:
        return body, 0
    return torch.cat([t[:, :prefix, r * hp:(r + 1) * hp], body], dim=1), prefix


def _to_seq_shards(out: torch.Tensor, prefix: int, shard: SeqShard) -> torch.Tensor:
    """Inverse of ``_to_head_shards`` for the attention output; the prefix's heads are all-gathered."""
    import torch.distributed as dist

    p, n = shard.degree, shard.local
    b, _, hp, d = out.shape
    body = out[:, prefix:].reshape(b, p, n, hp, d).permute(1, 0, 2, 3, 4).contiguous()  # tokens of rank j
    body = _all_to_all(body, shard).permute(1, 2, 0, 3, 4).reshape(b, n, p * hp, d)  # heads of rank i
    if prefix == 0:
        return body
    head = out[:, :prefix].contiguous()
    heads = [torch.empty_like(head) for _ in range(p)]
    dist.all_gather(heads, head, group=shard.groups.sp_group)
    return torch.cat([torch.cat(heads, dim=2), body], dim=1)


def _padded_mask(attn_mask: Optional[torch.Tensor], q_prefix: int, k_prefix: int, heads: int,
                 shard: SeqShard) -> Optional[torch.Tensor]:
    """The caller's mask (over the unpadded global sequence, broadcastable to ``(B, H, S_q, S_k)``)
    extended to the padded one: padded keys never attend; this rank's heads only."""
    pad = shard.padded - shard.valid
    if attn_mask is None:
        if pad == 0:
            return None
        keys = torch.arange(k_prefix + shard.padded) < k_prefix + shard.valid
        return keys[None, None, None, :]
    mask = attn_mask
    if mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.shape[1] == heads * shard.degree and heads * shard.degree > 1:
        mask = mask[:, shard.rank * heads:(shard.rank + 1) * heads]
    if pad == 0:
        return mask
    blocked = False if mask.dtype == torch.bool else float("-inf")
    if mask.shape[-1] > 1:
        mask = torch.cat([mask, mask.new_full((*mask.shape[:-1], pad), blocked)], dim=-1)
    if mask.shape[-2] > 1:  # padded queries: attend like the first query row (any finite row will do)
        mask = torch.cat([mask, mask[..., :1, :].expand(*mask.shape[:-2], pad, mask.shape[-1])], dim=-2)
    return mask


def ulysses_attention(fn: Callable[..., torch.Tensor], query, key, value, attn_mask, scale,
                      shard: SeqShard) -> torch.Tensor:
    """Run attention backend ``fn`` on head shards of the full sequence; in and out: sequence shards."""
    heads = query.shape[2]
    if heads % shard.degree:
        raise ValueError(f"{heads} attention heads do not divide by sp_degree={shard.degree}")
    q, q_prefix = _to_head_shards(query, shard)
    k, k_prefix = _to_head_shards(key, shard)
    v, _ = _to_head_shards(value, shard)
    mask = _padded_mask(attn_mask, q_prefix, k_prefix, heads // shard.degree, shard)
    if mask is not None:
        mask = mask.to(q.device)
    out = fn(q, k, v, attn_mask=mask, scale=scale)
    return _to_seq_shards(out, q_prefix, shard)
