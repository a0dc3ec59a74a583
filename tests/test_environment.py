"""toolchain.environment: the CPU's int8 features and the pins, as reports and doctor use them."""

from toolchain.environment import cpu_facts, describe_cpu, environment_facts, pinned_versions

X86 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx_vnni amx_int8
"""
X86_AVX2 = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp i8mm\nCPU implementer\t: 0x41\n"


def test_x86_int8_features():
    facts = cpu_facts(X86)
    assert facts["model"] == "Intel(R) Xeon(R) Platinum 8480C"
    assert facts["int8_features"] == ["AVX2", "AVX512-VNNI", "AVX-VNNI", "AMX-INT8"]
    assert facts["int8_dot"] is True
    assert "AVX512-VNNI" in describe_cpu(facts)


def test_avx2_only_has_no_int8_dot_product():
    facts = cpu_facts(X86_AVX2)
    assert facts["int8_features"] == ["AVX2"] and facts["int8_dot"] is False


def test_arm_sdot():
    facts = cpu_facts(ARM)
    assert facts["int8_features"] == ["sdot (asimddp)", "i8mm"] and facts["int8_dot"] is True


def test_no_cpuinfo_still_describes():
    facts = cpu_facts("")
    assert facts["model"] and facts["int8_features"] == []
    assert "no int8 dot-product" in describe_cpu(facts)


def test_pins_cover_the_stack():
    pins = pinned_versions()
    for dist in ("torch", "executorch", "tensorflow-cpu", "ai-edge-litert", "onnx2tf"):
        assert pins.get(dist), dist


def test_environment_facts_name_the_cpu():
    env = environment_facts()
    assert env["cpu"]["model"] and isinstance(env["cuda"], list) and env["python"].count(".") == 2


def test_a_denied_amx_is_named_with_the_cpu():
    assert describe_cpu(cpu_facts(X86) | {"amx": "denied"}).endswith("; AMX denied to this process")
    assert "has no AMX" in describe_cpu(cpu_facts(X86_AVX2) | {"amx": "denied"})
    assert "AMX denied" not in describe_cpu(cpu_facts(X86))
