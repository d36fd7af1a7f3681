"""Pairwise GMF, the model CMN's memories are pretrained from: score = ReLU(vᵀ(p_u ⊙ q_i))."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.cmn import truncated_normal_


class GMF(nn.Module):
    def __init__(self, n_users: int, n_items: int, embed_size: int, l2: float, sparse_grad: bool = False):
        super().__init__()
        self.l2 = l2
        self.sparse_grad = sparse_grad
        self.user_embedding = nn.Parameter(truncated_normal_(torch.empty(n_users, embed_size), 0.01))  # P
        self.item_embedding = nn.Parameter(truncated_normal_(torch.empty(n_items, embed_size), 0.01))  # Q
        self.v = nn.Linear(embed_size, 1, bias=False)
        nn.init.xavier_uniform_(self.v.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        p_u = F.embedding(users, self.user_embedding, sparse=self.sparse_grad)
        q_i = F.embedding(items, self.item_embedding, sparse=self.sparse_grad)
        return F.relu(self.v(p_u * q_i)).squeeze(-1)

    def l2_penalty(self) -> torch.Tensor:
        return self.l2 * self.v.weight.pow(2).sum() / 2
