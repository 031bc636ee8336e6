"""--bf16 on a CPU without native bfloat16: detected from /proc/cpuinfo's flags and named in one warning line, in every
script with --bf16 (the CPU files below are real flag sets, shortened to the relevant part of the line)."""

import importlib

import pytest
import torch

SCRIPTS = ("sac_fetch_mlp", "sac_fetch_equivariant", "ppo_atari")
AVX2_ONLY = "flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand avx2 bmi2\n"
AVX512_BF16 = "flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni\n"
AMX = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl amx_bf16 amx_tile amx_int8\n"
NEOVERSE_V1 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm sve\n"
NEOVERSE_N1 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc\n"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("text, native", [(AVX2_ONLY, False), (AVX512_BF16, True), (AMX, True), (NEOVERSE_V1, True),
                                          (NEOVERSE_N1, False), ("processor\t: 0\n", None)])  # fmt: skip
def test_native_bf16_is_read_from_the_cpu_flags(script, text, native, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + text + "processor\t: 1\n" + text)
    assert importlib.import_module(script).native_bf16_cpu(str(cpuinfo)) is native


@pytest.mark.parametrize("script", SCRIPTS)
def test_bf16_on_an_avx2_only_cpu_warns_in_one_line(script, tmp_path, capsys):
    mod = importlib.import_module(script)
    avx2, bf16_cpu = tmp_path / "avx2", tmp_path / "bf16"
    avx2.write_text(AVX2_ONLY)
    bf16_cpu.write_text(AVX512_BF16)
    cpu = torch.device("cpu")
    assert mod.warn_emulated_bf16(True, cpu, str(avx2))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: --bf16 on a CPU without native bfloat16 (torch CPU capability ")
    assert torch.backends.cpu.get_cpu_capability() in line and "8x slower" in line
    for bf16, path in ((False, avx2), (True, bf16_cpu), (True, tmp_path / "missing")):  # float32, native, unknown
        assert not mod.warn_emulated_bf16(bf16, cpu, str(path))
    assert not mod.warn_emulated_bf16(True, torch.device("cuda"), str(avx2))  # a GPU's bfloat16 is its own
    assert capsys.readouterr().err == ""
