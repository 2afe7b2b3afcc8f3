"""train.mixed_precision=auto: bf16 where the device computes it natively, fp32 elsewhere; a warning for an explicit
bf16 that the CPU would emulate."""
from types import SimpleNamespace

import pytest
import torch

from ssl_bocb import config, device
from ssl_bocb.engine import make_accelerator


@pytest.fixture
def cpu_with(monkeypatch):
    """cpu_with({"avx2"}): the CPU flags /proc/cpuinfo would list, with PyTorch's own query saying no."""
    def install(flags):
        monkeypatch.delenv("SSL_BOCB_CPU_BF16", raising=False)
        monkeypatch.setattr(device, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return install


@pytest.mark.parametrize("flags, native", [({"avx2", "fma"}, False), ({"avx2", "avx512f"}, False),
                                           ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True)])
def test_auto_is_bf16_only_on_cpus_that_compute_it_natively(cpu_with, flags, native):
    cpu_with(flags)
    assert device.native_bf16(torch.device("cpu"))[0] is native
    assert device.resolve_precision("auto", "cpu") == ("bf16" if native else "no")
    assert device.resolve_precision("no", "cpu") == "no" and device.resolve_precision("fp16", "cpu") == "fp16"


def test_the_environment_overrides_the_cpu_query(cpu_with, monkeypatch):
    cpu_with({"avx2"})
    monkeypatch.setenv("SSL_BOCB_CPU_BF16", "1")
    assert device.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv("SSL_BOCB_CPU_BF16", "0")
    assert device.resolve_precision("auto", "cpu") == "no"


def test_gpus_use_their_bf16_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    for has, want in ((False, "no"), (True, "bf16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, h=has: h)
        assert device.resolve_precision("auto", torch.device("cuda", 0)) == want
    assert device.resolve_precision("auto", torch.device("mps")) == "no"


def test_explicit_bf16_on_an_emulating_cpu_warns_once(cpu_with, caplog, monkeypatch):
    cpu_with({"avx2"})
    monkeypatch.setattr(device, "_warned", set())
    for _ in range(3):
        assert device.resolve_precision("bf16", "cpu") == "bf16"  # the user's choice stands
    assert caplog.text.count("train.mixed_precision=bf16 on cpu") == 1
    assert "emulated" in caplog.text and "train.mixed_precision=auto" in caplog.text
    cpu_with({"avx512_bf16"})
    caplog.clear()
    device.resolve_precision("bf16", torch.device("cpu"), "mixed_precision")
    assert caplog.text == ""


@pytest.mark.parametrize("flags, want", [({"avx2"}, "no"), ({"amx_bf16"}, "bf16")])
def test_the_accelerator_gets_the_resolved_precision(cpu_with, flags, want):
    cpu_with(flags)
    acc = make_accelerator(SimpleNamespace(mixed_precision="auto", cpu=True))
    assert acc.mixed_precision == want and acc.device.type == "cpu"


def test_auto_is_the_default_and_a_valid_value():
    assert config.load(config.PretrainConfig, [], []).train.mixed_precision == "auto"
    assert config.load(config.EvalConfig, [], []).mixed_precision == "auto"
    with pytest.raises(Exception, match="mixed_precision"):
        config.load(config.PretrainConfig, [], ["train.mixed_precision=fp8"])


def test_channels_last_auto_is_for_convolutional_backbones_and_compile_is_opt_in():
    import timm
    resnet = timm.create_model("resnet18", num_classes=0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert device.use_channels_last(None, resnet, cpu) and device.use_channels_last(None, resnet, cuda)
    assert not device.use_channels_last(None, vit, cpu) and not device.use_channels_last(None, resnet, mps)
    assert not device.use_channels_last(False, resnet, cpu) and device.use_channels_last(True, vit, cpu)
    assert not device.use_compile(None, cpu) and device.use_compile(True, cpu)


def test_compile_with_a_hessian_optimizer_is_refused(tmp_path):
    from conftest import TINY
    from ssl_bocb.tasks import pretrain
    from ssl_bocb.errors import UserError
    cfg = config.load(config.PretrainConfig, [], TINY + [f"output_dir={tmp_path / 'r'}", "optim.name=sophia",
                                                          "train.compile=true"])
    with pytest.raises(UserError, match="train.compile=true with optim.name=sophia.*set train.compile=false"):
        pretrain(cfg)
    assert not (tmp_path / "r").exists()
