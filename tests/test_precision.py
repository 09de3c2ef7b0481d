"""Precision: strict fp32 (no TF32), the CUDA capability rule, and ``auto``'s measured, cached choice.

No test here times a network: the timing function is replaced by a counting fake, and every test
keeps its cache in tmp_path (never the user's ~/.cache)."""

import json

import pytest
import torch

from ssdd import precision
from ssdd.models import auto_precision
from ssdd.run import run_networks
from ssdd.errors import UserError
from ssdd.settings import load_config

NETS = {"convnet": dict(auto_precision.DEFAULT_NETWORK)}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own cache folder, no override from the environment, no decisions remembered from other tests."""
    monkeypatch.setenv("SSDD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SSDD_AUTO_PRECISION", raising=False)
    monkeypatch.setattr(auto_precision, "_decided", {})
    monkeypatch.setattr(auto_precision, "_logged", set())


class FakeTimer:
    """Stands in for measure_speedups: returns fixed ratios and counts its calls."""

    def __init__(self, ratios):
        self.ratios, self.calls = ratios, 0

    def __call__(self, networks, device):
        self.calls += 1
        return {label: self.ratios for label in networks} if isinstance(self.ratios, float) else dict(self.ratios)


def native_cpu(monkeypatch, native=True):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"} if native else {"avx2"}))
    monkeypatch.setattr(precision, "cpu_model", lambda: "Test CPU 9000")


def test_explicit_choices_never_calibrate(monkeypatch):
    native_cpu(monkeypatch)
    timer = FakeTimer(2.0)
    assert auto_precision.resolve("fp32", "cpu", measure=timer) == "fp32"
    assert auto_precision.resolve("bf16", "cpu", measure=timer) == "bf16"
    assert timer.calls == 0
    with pytest.raises(UserError, match="precision: expected one of"):
        auto_precision.resolve("fp16", "cpu")


@pytest.mark.parametrize("value", ["fp32", "bf16"])
def test_env_override_wins_without_timing(monkeypatch, value):
    native_cpu(monkeypatch, native=False)  # even bf16 on hardware without native bf16: the user asked
    monkeypatch.setenv("SSDD_AUTO_PRECISION", value)
    timer = FakeTimer(2.0)
    assert auto_precision.resolve("auto", "cpu", networks=NETS, measure=timer) == value
    assert timer.calls == 0


def test_bad_env_override_is_one_line_user_error(monkeypatch):
    monkeypatch.setenv("SSDD_AUTO_PRECISION", "fp16")
    with pytest.raises(UserError, match="SSDD_AUTO_PRECISION") as err:
        auto_precision.resolve("auto", "cpu", networks=NETS)
    assert "\n" not in str(err.value)


def test_non_native_device_resolves_fp32_without_timing(monkeypatch, tmp_path):
    native_cpu(monkeypatch, native=False)
    timer = FakeTimer(3.0)
    assert auto_precision.resolve("auto", "cpu", networks=NETS, measure=timer) == "fp32"
    assert timer.calls == 0 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("ratios,expected", [
    (1.9, "bf16"),
    ({"convnet": 1.9, "resnet18": 1.02}, "fp32"),  # not faster on every network: fp32
    (0.5, "fp32"),
])
def test_bf16_only_where_measured_faster_on_every_network(monkeypatch, ratios, expected):
    native_cpu(monkeypatch)
    nets = NETS if isinstance(ratios, float) else {k: dict(NETS["convnet"], widths=[8 * (i + 1)])
                                                   for i, k in enumerate(ratios)}
    assert auto_precision.resolve("auto", "cpu", networks=nets, measure=FakeTimer(ratios)) == expected


def test_cache_is_used_on_the_second_call(monkeypatch, tmp_path, caplog):
    native_cpu(monkeypatch)
    timer = FakeTimer(1.9)
    with caplog.at_level("INFO", logger="ssdd"):
        assert auto_precision.resolve("auto", "cpu", networks=NETS, measure=timer) == "bf16"
    assert "precision auto -> bf16 (measured on Test CPU 9000: bf16 1.90x faster on convnet; cached in" in caplog.text
    entry, = json.loads((tmp_path / "cache" / "precision.json").read_text())["entries"].values()
    assert entry["choice"] == "bf16" and entry["ratios"] == {"convnet": 1.9} and entry["torch"] == torch.__version__
    monkeypatch.setattr(auto_precision, "_decided", {})  # as a new process: only the file remembers
    assert auto_precision.resolve("auto", "cpu", networks=NETS, measure=timer) == "bf16"
    assert timer.calls == 1


@pytest.mark.parametrize("field,value", [("torch", "1.0.0"), ("device", "Other CPU")])
def test_cache_from_another_torch_or_device_is_not_reused(monkeypatch, tmp_path, field, value):
    native_cpu(monkeypatch)
    auto_precision.resolve("auto", "cpu", networks=NETS, measure=FakeTimer(1.9))
    path = tmp_path / "cache" / "precision.json"
    data = json.loads(path.read_text())
    entry, = data["entries"].values()
    entry[field] = value  # the file now holds only a calibration made elsewhere (under this key, even)
    path.write_text(json.dumps(data))
    monkeypatch.setattr(auto_precision, "_decided", {})
    timer = FakeTimer(0.8)
    assert auto_precision.resolve("auto", "cpu", networks=NETS, measure=timer) == "fp32"
    assert timer.calls == 1
    if field == "torch":  # and it is told apart by its key too: a changed version measures again
        monkeypatch.setattr(precision.torch, "__version__", "9.9.9")
        monkeypatch.setattr(auto_precision, "_decided", {})
        auto_precision.resolve("auto", "cpu", networks=NETS, measure=timer)
        assert timer.calls == 2


def test_other_networks_calibrate_separately(monkeypatch):
    native_cpu(monkeypatch)
    timer = FakeTimer(1.9)
    auto_precision.resolve("auto", "cpu", networks=NETS, measure=timer)
    auto_precision.resolve("auto", "cpu", networks={"convnet": dict(NETS["convnet"], widths=[8, 16])}, measure=timer)
    assert timer.calls == 2


def test_broken_cache_file_is_measured_again_and_replaced(monkeypatch, tmp_path):
    native_cpu(monkeypatch)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "precision.json").write_text("{not json")
    timer = FakeTimer(1.9)
    assert auto_precision.resolve("auto", "cpu", networks=NETS, measure=timer) == "bf16"
    assert timer.calls == 1 and json.loads((tmp_path / "cache" / "precision.json").read_text())["version"] == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_run_networks_from_the_config():
    """The demo's teacher and student are one network; quality-small's differ (pool, norm) on RGB."""
    demo = run_networks(load_config("demo"))
    assert list(demo) == ["convnet"] and demo["convnet"]["in_channels"] == 1 and demo["convnet"]["image_size"] == 32
    small = run_networks(load_config("quality-small"))
    assert sorted(small) == ["convnet (student)", "convnet (teacher)"]
    assert all(s["in_channels"] == 3 for s in small.values())


def test_use_fp32_switches_tf32_off_and_restores(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.set_float32_matmul_precision("high")
    try:
        assert torch.backends.cuda.matmul.allow_tf32
        with precision.use("fp32"):
            assert precision.current() == "fp32"
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        with pytest.raises(RuntimeError), precision.use("fp32"):  # restored on an error too
            raise RuntimeError
        assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("capability,expected", [((7, 5), False), ((8, 0), True), ((9, 0), True), ((6, 1), False)])
def test_cuda_native_bf16_is_compute_capability_8(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there: unused
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert precision.native_bf16("cuda:1") is expected
    assert asked == [torch.device("cuda:1")]  # the given device, not the current one


def test_cuda_without_cuda_is_not_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.native_bf16("cuda") is False


def test_timing_runs_both_precisions_and_leaves_the_rng_alone():
    """A real (tiny) calibration pass: both precisions timed per round, the global RNG untouched."""
    tiny = {"tiny": dict(auto_precision.DEFAULT_NETWORK, widths=[4], image_size=8)}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    times = auto_precision.time_passes(tiny, "cpu", budget_s=0.0, batch=2, min_reps=2)
    assert torch.equal(torch.rand(3), expected)
    assert len(times["tiny"]["fp32"]) == len(times["tiny"]["bf16"]) == 2
    assert auto_precision.speed_ratio(times["tiny"]) > 0


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_use_fp32_with_torch_newer_tf32_api():
    """A caller who set TF32 with torch's per-backend API (legacy getters then raise) still gets IEEE fp32."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    before = [b.fp32_precision for b in backends]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        with precision.use("fp32"):
            assert [b.fp32_precision for b in backends] == ["ieee"] * 3
        assert [b.fp32_precision for b in backends[:2]] == ["tf32", "tf32"]
    finally:
        for b, value in zip(backends, before):
            b.fp32_precision = value
    assert torch.get_float32_matmul_precision() == "highest"  # legacy getters read again
