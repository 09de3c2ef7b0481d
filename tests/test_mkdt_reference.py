"""MKDT's switches toward the authors' code: the reference minibatch order (``batch_order``) and experts
kept in fp32 whatever the stage's precision (``distill.experts.precision``)."""

import pytest
import torch

from ssdd import precision
from ssdd.data import ImageSet, Normalizer
from ssdd.distill.engines.experts import ExpertsConfig, train_expert
from ssdd.distill.engines.trajectory import minibatches, unrolled_params
from ssdd.distill.registry import DistillContext
from ssdd.errors import UserError
from ssdd.models import build
from ssdd.settings import DistillConfig, load_config
from ssdd.teacher import FeatureExtractor


def test_reference_order_uses_the_chunks_of_each_permutation_last_first():
    gen = torch.Generator().manual_seed(3)
    batches = minibatches(12, 5, 5, gen, order="reference")
    again = torch.Generator().manual_seed(3)
    first, second = torch.randperm(12, generator=again), torch.randperm(12, generator=again)
    expected = list(reversed(first.split(5))) + list(reversed(second.split(5)))[:2]
    assert [b.tolist() for b in batches] == [b.tolist() for b in expected]
    assert [len(b) for b in batches] == [2, 5, 5, 2, 5]  # the short remainder first
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(12))  # every image once per permutation
    whole = minibatches(6, 0, 2, torch.Generator().manual_seed(0), order="reference")
    assert all(sorted(b.tolist()) == list(range(6)) for b in whole) and not torch.equal(whole[0], whole[1])
    with pytest.raises(ValueError, match="batch order"):
        minibatches(6, 2, 1, order="sideways")


def test_the_orders_differ_only_in_which_images_each_step_sees():
    """Whole set, one step: the reference order's permutation changes nothing but summation order."""
    torch.manual_seed(0)
    spec = {"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 3, "widths": [4], "pool": "flatten",
            "norm": "instance"}
    model = build(spec).double()
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    a = unrolled_params(model, start, x, y, 0.1, 1, 0, torch.Generator().manual_seed(1), order="chunks")
    b = unrolled_params(model, start, x, y, 0.1, 1, 0, torch.Generator().manual_seed(1), order="reference")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    c = unrolled_params(model, start, x, y, 0.1, 2, 4, torch.Generator().manual_seed(1), order="chunks")
    d = unrolled_params(model, start, x, y, 0.1, 2, 4, torch.Generator().manual_seed(1), order="reference")
    assert not torch.allclose(c, d)


def test_batch_order_and_experts_precision_are_checked_keys():
    cfg = load_config("demo", {"distill.mkdt.batch_order": "reference", "distill.mtt.batch_order": "reference",
                               "distill.experts.precision": "fp32"})
    assert cfg.distill.mkdt.batch_order == "reference" and cfg.distill.experts.precision == "fp32"
    with pytest.raises(UserError, match="batch_order"):
        load_config("demo", {"distill.mkdt.batch_order": "random"})
    with pytest.raises(UserError, match="precision"):
        load_config("demo", {"distill.experts.precision": "bf16"})


def _ctx(experts_precision):
    gen = torch.Generator().manual_seed(0)
    source = ImageSet(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen))
    torch.manual_seed(1)
    teacher = FeatureExtractor(build({"arch": "convnet", "in_channels": 3, "image_size": 16, "out_dim": 0,
                                      "widths": [8], "pool": "gap", "norm": "batch"})).eval()
    cfg = DistillConfig(m=4, experts=ExpertsConfig(count=1, epochs=1, batch=16, precision=experts_precision))
    return DistillContext(source=source, heldout=None, teacher=teacher, norm=Normalizer(*source.mean_std()),
                          spec={"arch": "convnet", "in_channels": 3, "image_size": 16, "out_dim": 8, "widths": [8, 8],
                                "pool": "flatten", "norm": "instance"},
                          cfg=cfg, seed=0, init_index=torch.arange(4), device="cpu", progress=False)


@pytest.mark.skipif(not precision.native_bf16("cpu"), reason="this CPU has no native bf16")
def test_fp32_experts_ignore_a_bf16_stage():
    plain, _ = train_expert(_ctx("stage"), 0)  # an fp32 stage
    with precision.use("bf16"):
        kept, _ = train_expert(_ctx("fp32"), 0)
        staged, _ = train_expert(_ctx("stage"), 0)
    assert torch.equal(kept, plain)
    assert not torch.equal(staged, plain)
