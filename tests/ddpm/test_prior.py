"""unCLIP's prior in the core: a DDPM over (B, E) embedding vectors through the same loss, samplers and guidance as
images, and a Transformer denoiser that learns a caption -> embedding map.

The captions here are stand-ins for a frozen text encoder's output: each of K "prompts" is a fixed random (L, D)
token-state matrix and pooled vector; prompt k's image embeddings are unit vectors scattered around a direction u_k
(cosine about 0.95 to it). A prior that reads its caption samples near u_k; one that ignores it cannot beat the best
single direction for all prompts.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ddpm import NoiseSchedule, diffusion_loss, sample
from ddpm.conditioning import Condition
from ddpm.prior import DiffusionPrior, PriorConfig, embedding_scale, normalize

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py

E, D, L, K = 16, 12, 4, 6  # embedding, text width, tokens, prompts


def world(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states, pooled = torch.randn(K, L, D, generator=g), torch.randn(K, D, generator=g)
    empty = Condition(text=torch.zeros(1, L, D), pooled=torch.zeros(1, D))  # the empty prompt's encoding
    directions = F.normalize(torch.randn(K, E, generator=g), dim=1)  # u_k
    return states, pooled, empty, directions


def captions(k: torch.Tensor, states, pooled, empty) -> Condition:
    """Prompts k (B,) as a text Condition whose negative is the empty prompt."""
    n = len(k)
    return Condition(text=states[k], pooled=pooled[k],
                     negative=Condition(text=empty.text.expand(n, -1, -1), pooled=empty.pooled.expand(n, -1)))


def test_config_and_shapes():
    with pytest.raises(ValueError, match="divisible"):
        PriorConfig(embed_dim=E, text_dim=D, width=30, heads=4)
    with pytest.raises(ValueError, match="embed_dim"):
        PriorConfig(embed_dim=0, text_dim=D)
    config = PriorConfig(embed_dim=E, text_dim=D, width=32, depth=2, heads=4)
    assert PriorConfig.from_dict(config.to_dict()) == config
    prior = DiffusionPrior(config).eval()
    states, pooled, empty, _ = world()
    c = captions(torch.tensor([0, 3, 5]), states, pooled, empty)
    assert prior(torch.randn(3, E), torch.tensor([0, 10, 999]), c).shape == (3, E)
    with pytest.raises(ValueError, match="text Condition"):
        prior(torch.randn(3, E), torch.tensor([0, 10, 999]), Condition(labels=torch.tensor([0, 1, 2])))
    # the samplers and guidance take (B, E) as they take images
    x = sample(prior, NoiseSchedule.linear(), torch.randn(3, E), steps=4, prediction_type="sample", condition=c,
               guidance_scale=3.0)
    assert x.shape == (3, E) and torch.isfinite(x).all()
    assert torch.allclose(normalize(x).norm(dim=1), torch.ones(3))


def test_the_prior_learns_which_embedding_a_caption_names():
    torch.manual_seed(0)
    states, pooled, empty, u = world()
    schedule = NoiseSchedule.linear()
    prior = DiffusionPrior(PriorConfig(embed_dim=E, text_dim=D, width=64, depth=2, heads=4))
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    scale = embedding_scale(E)
    for _ in range(400):
        k = torch.randint(0, K, (64,), generator=g)
        z = F.normalize(u[k] + 0.08 * torch.randn(64, E, generator=g), dim=1)  # cos(z, u_k) about 0.95
        loss = diffusion_loss(prior, schedule, scale * z, condition=captions(k, states, pooled, empty),
                              prediction_type="sample", generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prior.eval()
    k = torch.arange(K).repeat_interleave(20)  # (120,)
    x_T = torch.randn(len(k), E, generator=torch.Generator().manual_seed(2))
    z = normalize(sample(prior, schedule, x_T, steps=20, prediction_type="sample",
                         condition=captions(k, states, pooled, empty)))
    cosine = (z @ u.T)  # (120, K)
    own = cosine[torch.arange(len(k)), k].mean().item()
    best_single = max((F.normalize(u.mean(0), dim=0) @ u.T).mean().item(), 0.0)  # one direction for every prompt
    print(f"cosine to the caption's direction {own:.3f}; best caption-blind direction {best_single:.3f}")
    assert own > 0.8 and own > best_single + 0.4
    assert (cosine.argmax(dim=1) == k).float().mean().item() > 0.95  # nearest direction is the caption's
    assert math.isfinite(loss.item())


def test_a_saved_prior_loads_and_an_embedding_depends_on_its_seed_alone(tmp_path):
    from ddpm import prior as prior_format
    from ddpm.generation import sample_embeddings
    from ddpm.prior import PriorError

    torch.manual_seed(0)
    states, pooled, empty, _ = world()
    schedule = NoiseSchedule.cosine()
    model = DiffusionPrior(PriorConfig(embed_dim=E, text_dim=D, width=32, depth=2, heads=4)).eval()
    folder = prior_format.save(tmp_path / "prior", model, schedule, metadata={"clip": {"uri": "models:/clip/1"}})
    loaded = prior_format.load(folder)
    assert loaded.metadata == {"clip": {"uri": "models:/clip/1"}}
    assert torch.equal(loaded.schedule.alphas_cumprod, schedule.alphas_cumprod)
    k = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    kw = dict(steps=5, guidance_scale=2.0)
    batch = sample_embeddings(loaded.model, loaded.schedule, captions(k, states, pooled, empty), list(range(9)), **kw)
    alone = sample_embeddings(loaded.model, loaded.schedule, captions(k[4:5], states, pooled, empty), [4], **kw)
    assert torch.equal(batch[4:5], alone)  # fixed forward rows and per-seed noise: batch-mates do not matter
    assert torch.allclose(batch.norm(dim=1), torch.ones(9))
    (folder / "config.json").write_text('{"format": "ddpm-checkpoint"}')
    with pytest.raises(PriorError, match="expected 'ddpm-prior' version 1"):
        prior_format.load(folder)
