"""VRSP's mask branch (Xiao et al., AAAI'21; the seed table's "ShapeDict"): coarse
amodal and visible masks, visible attention refinement, and a shape prior from a
per-class codebook of amodal-mask embeddings fused into the refined amodal mask.

The amodal and visible heads are two Mask R-CNN conv heads whose weights are reused
in every pass:

    coarse   A0 = amodal(x)                 V0 = visible(x)
    VAR      V1 = visible(x * att(A0))      att(m) = sigmoid(avgpool2(m)), the RoI's class channel
    refine   A1 = amodal(fuse([x * att(V1), prior]))   (x * att(V1) before the codebook exists)

`prior` is the decoded masks of the codebook entries nearest to the embedding of A0
(its probabilities), average-pooled to the feature size and detached. The codebook
(class, entry, latent) is built by k-means over autoencoder embeddings of training
amodal masks (`kmeans`, `MaskAutoencoder`); at inference each detection's score is
multiplied by how close its final mask lies to its nearest codebook shape (`shape_score`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from amodal3d.models.amodal_roi_heads import SCORE_FACTORS, ConvMaskBranch, MaskBranch, pick_channel

MASK_SIZE = 28  # the RoI mask resolution the heads predict


class MaskAutoencoder(nn.Module):
    """28x28 mask probabilities -> latent (8 x s x s) -> 28x28 probabilities. Encoder:
    `convs` stride-2 conv3x3 with 8 channels (3 convs: 8x4x4, as VRSP's COCOA/D2SA
    config; 2: 8x7x7, its KINS one); decoder: bilinear upsampling + conv back to 28x28."""

    def __init__(self, convs: int = 3, channels: int = 8) -> None:
        super().__init__()
        if convs < 1:
            raise ValueError(f"MaskAutoencoder: convs={convs} must be >= 1")
        sizes = [MASK_SIZE]
        for _ in range(convs):
            sizes.append((sizes[-1] + 1) // 2)
        self.sizes = sizes  # 28, 14, 7, 4
        enc, c = [], 1
        for _ in range(convs):
            enc += [nn.Conv2d(c, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            c = channels
        self.encoder = nn.Sequential(*enc[:-1])  # a linear latent
        self.decoder = nn.ModuleList(nn.Conv2d(channels, channels if i < convs - 1 else 1, 3, padding=1)
                                     for i in range(convs))
        self.channels = channels
        self.latent_dim = channels * sizes[-1] ** 2

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """(N,28,28) in [0,1] -> (N,D)."""
        return self.encoder(masks[:, None].float()).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N,D) -> (N,28,28) probabilities."""
        s = self.sizes[-1]
        h = z.view(len(z), self.channels, s, s)
        for i, (conv, size) in enumerate(zip(self.decoder, reversed(self.sizes[:-1]))):
            h = conv(F.interpolate(h, size=(size, size), mode="bilinear", align_corners=False))
            if i < len(self.decoder) - 1:
                h = F.relu(h)
        return torch.sigmoid(h[:, 0])

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(masks))


def augment_masks(masks: torch.Tensor) -> torch.Tensor:
    """The 8 rotations/flips of each (N,M,M) mask (VRSP embeds its codebook masks so): (8N,M,M)."""
    views = []
    for flip in (False, True):
        m = masks.flip(-1) if flip else masks
        views += [torch.rot90(m, k, dims=(-2, -1)) for k in range(4)]
    return torch.cat(views)


def kmeans(x: torch.Tensor, k: int, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """(k, D) centres of Lloyd's k-means over the rows of x (k-means++ seeding, a fixed
    generator). With fewer rows than k, the rows are repeated to fill the k centres."""
    if len(x) == 0:
        raise ValueError("kmeans: no samples")
    x = x.float()
    if len(x) <= k:
        return x[torch.arange(k) % len(x)].clone()
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    d2 = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(k - 1):
        pick = torch.multinomial(d2 + 1e-12, 1, generator=g)
        centres = torch.cat([centres, x[pick]])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
    return centres


def nearest_entries(codebook: torch.Tensor, z: torch.Tensor, classes: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (N,n) of the n codebook entries of each row's class nearest to z (N,D);
    codebook (C,K,D), classes (N,) in 0..C-1."""
    entries = codebook[classes]  # (N,K,D)
    d = ((entries - z[:, None]) ** 2).sum(-1)
    return d.topk(min(n, d.shape[1]), dim=1, largest=False).indices


def shape_score(masks: torch.Tensor, nearest_decoded: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """VRSP's shape-prior rescoring factor, relu(log(alpha - s) / log(alpha)) with s the
    mean absolute difference between a mask (N,M,M) and its nearest codebook decode: 1 for
    a mask the codebook holds, 0 from s = alpha - 1 on."""
    s = (masks - nearest_decoded).abs().flatten(1).mean(1)
    return torch.relu(torch.log((alpha - s).clamp(min=1e-6)) / math.log(alpha))


def attention(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sigmoid(avgpool2(class channel of 28x28 logits)): (N,1,14,14), the gate on the RoI features."""
    return torch.sigmoid(F.avg_pool2d(pick_channel(logits, labels), 2))


class VrspMaskBranch(MaskBranch):
    """-> coarse_masks (A0), coarse_visible_masks (V0), visible_masks (V1), masks (A1);
    A0 trains on the amodal target, V0 on the visible one (`derived`). At inference
    the output `score_factors` holds VRSP's shape rescoring once the codebook is built."""

    uses_labels = True

    def __init__(self, in_channels: int, channels: int, layers: int, num_classes: int, categories: int,
                 codebook_size: int = 128, neighbours: int = 16, autoencoder_convs: int = 3,
                 rescore_alpha: float = 2.0, use_prior: bool = False, norm_layer=None) -> None:
        super().__init__()
        self.amodal = ConvMaskBranch(in_channels, channels, layers, num_classes, "masks", norm_layer)
        self.visible = ConvMaskBranch(in_channels, channels, layers, num_classes, "visible_masks", norm_layer)
        self.autoencoder = MaskAutoencoder(autoencoder_convs)
        self.register_buffer("codebook", torch.zeros(categories, codebook_size, self.autoencoder.latent_dim))
        self.register_buffer("codebook_built", torch.zeros((), dtype=torch.bool))
        self.neighbours = int(neighbours)
        self.alpha = float(rescore_alpha)
        self.use_prior = bool(use_prior)
        self.rescore = True  # the codebook rescoring at inference (off: for the ablation of bench/vrsp_ablation.py)
        # the prior fusion exists only in the phase that uses it (no unused parameters under DDP)
        self.fuse = nn.Conv2d(in_channels + self.neighbours, in_channels, 3, padding=1) if use_prior else None
        self.weights = {"coarse_masks": 1.0, "coarse_visible_masks": 1.0, "visible_masks": 1.0, "masks": 1.0}
        self.derived = {"coarse_masks": ("masks", None), "coarse_visible_masks": ("visible_masks", None)}

    def set_codebook(self, codebook: torch.Tensor) -> None:
        if codebook.shape != self.codebook.shape:
            raise ValueError(f"codebook of shape {tuple(codebook.shape)}, expected {tuple(self.codebook.shape)} "
                             "(model.codebook_size and the autoencoder's latent)")
        self.codebook.copy_(codebook)
        self.codebook_built.fill_(True)

    def prior(self, coarse: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(N,n,14,14): the decoded nearest codebook shapes of the coarse amodal masks (N,28,28)."""
        with torch.no_grad():
            z = self.autoencoder.encode(coarse.float())
            idx = nearest_entries(self.codebook, z, classes, self.neighbours)  # (N,n)
            decoded = self.autoencoder.decode(self.codebook[classes[:, None], idx].flatten(0, 1).to(z.dtype))
            decoded = decoded.view(len(z), idx.shape[1], MASK_SIZE, MASK_SIZE)
            if idx.shape[1] < self.neighbours:  # a codebook smaller than the neighbour count
                decoded = decoded[:, torch.arange(self.neighbours) % idx.shape[1]]
        return F.avg_pool2d(decoded, 2)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        a0 = self.amodal(features)["masks"]
        v0 = self.visible(features)["visible_masks"]
        v1 = self.visible(features * attention(a0, labels))["visible_masks"]
        x = features * attention(v1, labels)
        classes = (labels - 1).clamp(min=0)
        if self.use_prior:
            if not bool(self.codebook_built):
                raise RuntimeError("VRSP: model.use_prior=true but the codebook was never built "
                                   "(train with `make train STAGE=vrsp`, whose codebook phase builds it)")
            prior = self.prior(torch.sigmoid(pick_channel(a0, labels)[:, 0]), classes)
            x = self.fuse(torch.cat([x, prior.to(x.dtype)], 1))
        a1 = self.amodal(x)["masks"]
        out = {"coarse_masks": a0, "coarse_visible_masks": v0, "visible_masks": v1, "masks": a1}
        if not self.training and self.rescore and bool(self.codebook_built):
            with torch.no_grad():
                final = torch.sigmoid(pick_channel(a1, labels)[:, 0]).float()
                z = self.autoencoder.encode(final)
                idx = nearest_entries(self.codebook, z, classes, 1)[:, 0]
                out[SCORE_FACTORS] = shape_score(final, self.autoencoder.decode(self.codebook[classes, idx]),
                                                 self.alpha)
        return out
