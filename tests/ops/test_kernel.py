import pytest

from hstu.ops.kernel import Kernel, implementation


def test_parse_names_and_tzrec_numbers():
    assert Kernel.parse("triton") is Kernel.TRITON
    assert Kernel.parse(0) is Kernel.TRITON
    assert Kernel.parse(1) is Kernel.PYTORCH
    assert Kernel.parse(2) is Kernel.CUTLASS
    with pytest.raises(ValueError, match="kernel number 7"):
        Kernel.parse(7)


def test_dispatch_resolves_module_paths(monkeypatch):
    imported = []

    def fake_import(name):
        imported.append(name)

        class Module:
            op = object()

        return Module

    monkeypatch.setattr("hstu.ops.kernel.importlib.import_module", fake_import)
    implementation("stu", "op", Kernel.CUTLASS)
    implementation("attention", "op", Kernel.CUTLASS)
    implementation("jagged", "op", "PYTORCH")
    assert imported == [
        "hstu.ops.triton.stu", "hstu.ops.cutlass.attention", "hstu.ops.pytorch.jagged"
    ]


def test_a_missing_kernel_family_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="kernel TRITON has no no_such_family ops"):
        implementation("no_such_family", "op", Kernel.TRITON)
    with pytest.raises(NotImplementedError, match="does not implement jagged.no_such_op"):
        implementation("jagged", "no_such_op", Kernel.PYTORCH)
