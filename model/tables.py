"""The scorer's model as live tables: user and item rows that grow and change while serving, and the user-independent
`Tables` derived from them.

Live users and items write into the model (`reserve_users`, `set_users`, `add_items`, `set_items`); a caller's model
is copied before the first write (copy-on-write), so the scorer never changes a model it was given. What reads the
rows (the scoring routes' caches) is the scorer's to rebuild: every write here keeps `Tables` in step only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from model.cmn import CMN


@dataclass
class Tables:
    """User-independent tables of one model's weights, shared by the routes."""
    out_values: torch.Tensor        # (n_users, d) U_2 C[v] + b: the last hop's values already in the output layer
    values_ones: torch.Tensor       # (n_users, d') C[v], then a ones column (see `of`)
    out_values_ones: torch.Tensor   # (n_users, d') U_2 C[v] + b, then a ones column
    keys_t: torch.Tensor            # (d, n_users) Mᵀ, a view: sampled_addmm then reads M[v] as one contiguous row
    hop2_item: torch.Tensor | None  # (n_items, d) W_2 e_i + b_2, hop 2's item half (None with one hop)

    @classmethod
    def of(cls, model: CMN) -> Tables:
        m, d = model, model.cfg.embed_size
        out_values = F.linear(m.user_output, m.output.weight[:, d:], m.output.bias)
        # the ones column makes embedding_bag sum the softmax denominator too; zero columns after it round rows up
        # to a multiple of 16 floats (64-byte rows: embedding_bag runs measurably faster on them)
        ones = torch.zeros(m.cfg.n_users, -(-(d + 1) // 16) * 16 - d, device=out_values.device)
        ones[:, 0] = 1
        hop2_item = cls.hop2_rows(m, m.item_memory)
        return cls(out_values, torch.cat([m.user_output, ones], 1), torch.cat([out_values, ones], 1),
                   m.user_memory.T, hop2_item)

    def grown(self, model: CMN) -> Tables:
        """These tables for `model` after its user tables grew: the old rows kept as they are (bit for bit, and no
        O(users) recomputation), the new ones zero (no user yet; `set_users` fills them)."""
        extra = model.user_memory.shape[0] - self.out_values.shape[0]
        grow = lambda t: torch.cat([t, t.new_zeros(extra, t.shape[1])])
        values_ones, out_values_ones = grow(self.values_ones), grow(self.out_values_ones)
        values_ones[-extra:, model.cfg.embed_size] = out_values_ones[-extra:, model.cfg.embed_size] = 1
        return Tables(grow(self.out_values), values_ones, out_values_ones, model.user_memory.T, self.hop2_item)

    def set_users(self, model: CMN, users: torch.Tensor) -> None:
        """The rows of `users` after their rows of M and C changed (`keys_t` is a view of M: nothing to do)."""
        d = model.cfg.embed_size
        out = F.linear(model.user_output[users], model.output.weight[:, d:], model.output.bias)
        self.out_values[users] = out
        self.values_ones[users, :d] = model.user_output[users]
        self.out_values_ones[users, :d] = out

    @staticmethod
    def hop2_rows(model: CMN, memory: torch.Tensor) -> torch.Tensor | None:
        """Hop 2's item half `W_2 e + b_2` of the item rows `memory` (None with one hop)."""
        return F.linear(memory, model.hop_maps[0].weight, model.hop_maps[0].bias) if model.hop_maps else None


class LiveModel:
    """A model whose user and item tables grow, copied before its first write unless `owns` it, and its `Tables`."""

    def __init__(self, model: CMN, owns: bool):
        self.model, self.owns = model, owns
        self.refresh()

    @property
    def capacity(self) -> int:
        """Rows of the user tables."""
        return self.model.user_memory.shape[0]

    @torch.no_grad()
    def refresh(self) -> None:
        """The tables again, after the model's weights changed."""
        self.tables = Tables.of(self.model)

    def own(self) -> bool:
        """Copy a caller's model before writing into it; True when it was copied (what read it reads a new one)."""
        if self.owns:
            return False
        self.model, self.owns = copy.deepcopy(self.model), True
        self.refresh()
        return True

    def reserve_users(self, needed: int) -> None:
        """User tables of at least `needed` rows, the new ones zero. They grow by half their size at a time, so users
        added one by one cost amortised O(d) each, not a rebuild of every user-sized cache per user."""
        old_rows = self.capacity
        rows = max(needed, old_rows + old_rows // 2, old_rows + 64)
        for name in ("user_memory", "user_output"):
            old = getattr(self.model, name)
            table = torch.cat([old.detach(), old.new_zeros(rows - old_rows, old.shape[1])])
            setattr(self.model, name, torch.nn.Parameter(table, requires_grad=old.requires_grad))
        self.model.cfg = replace(self.model.cfg, n_users=rows)     # a copy: the config may be a checkpoint's
        self.tables = self.tables.grown(self.model)

    def set_users(self, users: torch.Tensor, memory: torch.Tensor, output: torch.Tensor) -> None:
        self.model.user_memory[users] = memory.to(users.device)
        self.model.user_output[users] = output.to(users.device)
        self.tables.set_users(self.model, users)

    def add_items(self, memory: torch.Tensor) -> None:
        """Item tables grown by exactly these rows of E: an item changes the catalogue's width, which every score
        row has."""
        old = self.model.item_memory
        memory = memory.to(old.device)
        self.model.item_memory = torch.nn.Parameter(torch.cat([old.detach(), memory]), requires_grad=old.requires_grad)
        self.model.cfg = replace(self.model.cfg, n_items=self.model.item_memory.shape[0])
        if self.tables.hop2_item is not None:
            self.tables.hop2_item = torch.cat([self.tables.hop2_item, Tables.hop2_rows(self.model, memory)])

    def set_items(self, items: torch.Tensor, memory: torch.Tensor) -> None:
        self.model.item_memory[items] = memory.to(items.device)
        if self.tables.hop2_item is not None:
            self.tables.hop2_item[items] = Tables.hop2_rows(self.model, self.model.item_memory[items])
