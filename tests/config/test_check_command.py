"""`launch.py check`: summary and exit 0 for a good recipe, one message and exit 1 for a bad one.

(hstu/cli/check.py is tested here, beside the config it summarizes.)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from hstu.cli import check


def _launch_main(kit):
    """launch.main, loaded from the repository's launch.py."""
    spec = importlib.util.spec_from_file_location("launch", kit.REPO_ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_check_prints_the_summary(kit, capsys):
    main = _launch_main(kit)
    status = main(["check", "--recipe", str(kit.REPO_ROOT / "recipes" / "smoke.config")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "model: dlrm_hstu, kernel PYTORCH, max_seq_len 256" in out
    assert "features (12):" in out
    assert "embedding tables (7):" in out
    assert "video_id_emb" in out and "uih_seq__video_id, cand_seq__video_id" in out
    assert "tasks (8):" in out
    # 16 x (1000 video ids + 1000 user ids + 8 + 9 + 9 + 8 + 8 profile codes), counted by hand.
    assert "sparse: 32,672 " in out
    assert "\n  dense: " in out
    assert "label cand_seq__watch_time is used by no task: not read" in out


def test_check_with_overrides(kit, capsys):
    main = _launch_main(kit)
    recipe = str(kit.REPO_ROOT / "recipes" / "smoke.config")
    status = main(
        [
            "check",
            "--recipe",
            recipe,
            "--set",
            "model_config.kernel=TRITON",
            "--set",
            "model_config.dlrm_hstu.max_seq_len=512",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "kernel TRITON, max_seq_len 512" in out


def test_dense_count_falls_back_when_the_model_is_missing(kit, monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(check.importlib, "import_module", missing)
    text, usable = check._dense_summary(kit.load(kit.BASE))
    assert usable and text.startswith("(model not available")


def test_bad_config_exits_1_with_one_message(kit, tmp_path):
    bad = tmp_path / "bad.config"
    bad.write_text(kit.edit("attention_dim: 8 }", "attention_dim: 8 }\n      kernal: TRITON"))
    result = subprocess.run(
        [sys.executable, "launch.py", "check", "--recipe", str(bad)],
        cwd=kit.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    line, column = kit.position(bad.read_text(), "kernal")
    assert lines == [
        f'launch.py check: {bad}:{line}:{column}: model_config.dlrm_hstu.hstu: unknown field '
        '"kernal" in HSTU'
    ], result.stderr


def test_bad_override_exits_1(kit, capsys):
    main = _launch_main(kit)
    recipe = str(kit.REPO_ROOT / "recipes" / "smoke.config")
    status = main(["check", "--recipe", recipe, "--set", "model_config.kernel=CUTLASS"])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    # smoke.config has no mixed_precision, which CUTLASS needs: the error names train_config.
    assert captured.err.startswith(f"launch.py check: {recipe}:")
    assert ": train_config.mixed_precision: kernel CUTLASS" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_a_config_the_model_rejects_exits_1_with_the_prefixed_line(kit, capsys, monkeypatch):
    import hstu.model

    def rejects(cfg):
        raise ValueError("model_config.dlrm_hstu.hstu.stu.num_heads: must divide embedding_dim")

    monkeypatch.setattr(hstu.model, "model_summary", rejects)
    main = _launch_main(kit)
    status = main(["check", "--recipe", str(kit.REPO_ROOT / "recipes" / "smoke.config")])
    captured = capsys.readouterr()
    assert status == 1
    assert "model_summary failed: ValueError: model_config.dlrm_hstu.hstu.stu.num_heads" in (
        captured.out)
    assert captured.err.strip().splitlines() == [
        "launch.py check: the model rejects this config (see the dense line above)"]


def test_check_notes_what_a_gpu_kernel_needs(kit, capsys):
    main = _launch_main(kit)
    recipe = str(kit.REPO_ROOT / "recipes" / "smoke.config")
    status = main(["check", "--recipe", recipe, "--set", "model_config.kernel=CUTLASS",
                   "--set", "train_config.mixed_precision=BF16"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "model_config.kernel CUTLASS runs on CUDA GPUs: train with --use-gpu" in out
    if importlib.util.find_spec("hstu_attn") is None:
        assert "not on this machine (the GPU workers need it): kernel CUTLASS needs" in out
    main(["check", "--recipe", recipe])
    assert "CUDA GPUs" not in capsys.readouterr().out  # PYTORCH runs anywhere: no note
